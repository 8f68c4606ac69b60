//! A cluster client's command on its way: sent to one or more masters, queued in the
//! client's order, and resolved by the reply side into what the client gets.
//!
//! A [`Dispatch`] is one run of commands for one master, or one client command that went
//! to several ([`Merge`] says how their replies become one). The reply side takes
//! dispatches in order and waits for each one's replies; a reply that says the command did
//! not run ([`crate::cluster::redirect`]) is followed — the command sent again to the node
//! `MOVED` names, or with `ASKING` to the node `ASK` names, or after a pause for `TRYAGAIN`
//! and `CLUSTERDOWN`, until `upstream.outage_wait` from when it was first sent has passed
//! (the client then gets the cluster's own last word, which says the command did not run).
//! Each redirected command is resolved before the next reply is looked at, so two commands
//! for one slot that are both redirected run in the client's order.
//!
//! A connection that fails with replies owed, or a reply that does not come within
//! `upstream.reply_timeout`, closes the client: what happened to its commands is unknown,
//! as when a standalone Redis fails (README, "When Redis fails").

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::replies::{End, ReplySide};
use super::state::Effect;
use crate::cluster::merge;
use crate::cluster::redirect::{self, Redirect};
use crate::cluster::route::Fanout;
use crate::cluster::router::{Node, Router};
use crate::resp::reply::ReplyScanner;
use crate::upstream::ConnError;
use crate::upstream::mux::{Mux, MuxMetrics};
use crate::upstream::pool::{Key, Unavailable};

/// Most `MOVED`/`ASK` one command follows (cluster clients allow about as many) before the
/// client is told it did not run.
const MAX_REDIRECTS: u32 = 16;
/// First and longest pause before a command refused with `TRYAGAIN` or `CLUSTERDOWN` is
/// sent again.
const BACKOFF_MIN: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Commands sent to one master in one write, whose replies come back together.
pub(super) struct Part {
    pub node: Arc<Node>,
    /// The commands as sent (multibulk, back to back), to send one again if redirected.
    pub bytes: Bytes,
    pub count: u32,
    pub rx: oneshot::Receiver<Vec<Bytes>>,
    /// Whether a redirecting reply is followed: not inside a transaction, where the
    /// command was queued (or refused, aborting the transaction) on its connection.
    pub follow: bool,
    /// A blocking command: its reply may take any time (no `upstream.reply_timeout`).
    pub blocking: bool,
    /// Replies owed on the client's private connection, counted down as they arrive.
    pub owed: Option<Arc<AtomicU32>>,
}

impl Part {
    /// Commands sent on a shared connection.
    pub fn shared(
        node: Arc<Node>,
        bytes: Bytes,
        count: u32,
        rx: oneshot::Receiver<Vec<Bytes>>,
    ) -> Part {
        Part {
            node,
            bytes,
            count,
            rx,
            follow: true,
            blocking: false,
            owed: None,
        }
    }
}

/// How a dispatch's replies become the client's.
#[derive(Debug)]
pub(super) enum Merge {
    /// Each command's reply, in order: a run forwarded as the client sent it.
    Each,
    /// A run for several masters, one part each: the `i`th reply the client gets is the
    /// next one of part `order[i]`.
    Interleave(Vec<usize>),
    /// One command sent to every master.
    Fanout(Fanout),
    /// `DEL`/`UNLINK`/`EXISTS`/`TOUCH` split by slot: counts summed. `writes` for
    /// `DEL`/`UNLINK`: parts that end differently (some ran, some were refused) close the
    /// client, as a lost connection would leave it.
    Sum { writes: bool },
    /// `MGET` split by slot: each part's keys were at these positions of the client's.
    MGet {
        places: Vec<Vec<usize>>,
        total: usize,
    },
    /// `SCAN` on the master at `position` of `masters`: the cursor rewritten.
    Scan { position: usize, masters: usize },
    /// Only the last reply (a `WAIT` after the write that makes it count the client's
    /// earlier writes).
    Last,
}

/// One queued dispatch.
pub(super) struct Dispatch {
    parts: Vec<Part>,
    merge: Merge,
    /// The client's connection state when it was sent: resends go to that state's groups.
    key: Arc<Key>,
    /// The state change the reply to its one command confirms (a transaction's start or
    /// end, a watch).
    effect: Option<Effect>,
    sent: Instant,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch")
            .field("parts", &self.parts.len())
            .field("merge", &self.merge)
            .finish()
    }
}

impl Dispatch {
    pub fn new(parts: Vec<Part>, merge: Merge, key: Arc<Key>) -> Dispatch {
        Dispatch {
            parts,
            merge,
            key,
            effect: None,
            sent: Instant::now(),
        }
    }

    /// With the state change its reply confirms.
    pub fn confirming(mut self, effect: Option<Effect>) -> Dispatch {
        self.effect = effect;
        self
    }
}

/// `ASKING`, sent right before a command `ASK` redirected, on the same connection.
const ASKING: &[u8] = b"*1\r\n$6\r\nASKING\r\n";

/// The `i`th command in `bytes` (multibulk commands back to back).
fn nth_command(bytes: &[u8], i: usize) -> Option<&[u8]> {
    let mut scanner = ReplyScanner::new(u64::MAX);
    let mut rest = bytes;
    for _ in 0..i {
        let (len, _) = scanner.next(rest).ok()??;
        rest = &rest[len..];
    }
    let (len, _) = scanner.next(rest).ok()??;
    Some(&rest[..len])
}

impl ReplySide<'_> {
    /// What the client gets for `d`, once every part has answered (redirections followed).
    pub(super) async fn resolve(&self, mut d: Dispatch) -> Result<Vec<u8>, End> {
        let links = self.links;
        let Some(router) = links.ctx.cluster.as_deref() else {
            return Err(End::Failed);
        };
        let deadline = d.sent + links.config.upstream.outage_wait;
        if let Merge::Interleave(order) = &mut d.merge {
            let order = std::mem::take(order);
            let parts = std::mem::take(&mut d.parts);
            return self
                .interleave(router, &d.key, parts, &order, deadline)
                .await;
        }
        let mut out = Vec::new();
        let mut finals = Vec::new();
        for part in d.parts {
            let replies = self.replies_of(router, part.rx, part.blocking).await?;
            if replies.len() != part.count as usize {
                return Err(End::Failed);
            }
            if let Some(owed) = &part.owed {
                owed.fetch_sub(part.count, Ordering::AcqRel);
            }
            for (i, reply) in replies.into_iter().enumerate() {
                let reply = if part.follow && redirect::parse(&reply).is_some() {
                    let Some(cmd) = nth_command(&part.bytes, i) else {
                        return Err(End::Failed);
                    };
                    let to = Follow {
                        key: &d.key,
                        node: &part.node,
                        blocking: part.blocking,
                        deadline,
                    };
                    self.follow(router, to, cmd, reply).await?
                } else {
                    reply
                };
                if let Some(effect) = d.effect.take() {
                    links.confirm(effect, &reply);
                }
                match d.merge {
                    Merge::Each => out.extend_from_slice(&reply),
                    _ => finals.push(reply),
                }
            }
        }
        let writes = match d.merge {
            Merge::Sum { writes } => writes,
            Merge::Fanout(fanout) => fanout.writes(),
            _ => false,
        };
        if writes && merge::partly_applied(&finals) {
            // Some masters applied it and some refused it: neither the sum nor the refusal
            // is true (G4, G6).
            debug!(
                "a command split across masters ran on some and was refused by others; closing the client"
            );
            return Err(End::Failed);
        }
        let merged = match d.merge {
            Merge::Each | Merge::Interleave(_) => return Ok(out),
            Merge::Fanout(fanout) => merge::fanout(fanout, &finals),
            Merge::Sum { .. } => merge::sum(&finals),
            Merge::MGet { places, total } => merge::mget(&finals, &places, total),
            Merge::Scan { position, masters } => match finals.first() {
                Some(reply) => merge::scan_reply(reply, position, masters),
                None => return Err(End::Failed),
            },
            Merge::Last => finals.pop().ok_or(End::Failed)?,
        };
        Ok(merged.to_vec())
    }

    /// A run over several masters: each part's replies, waited for when the client's order
    /// first needs one, followed where redirected (in the client's order, so two commands
    /// for one slot that are both redirected still run in it), and written in that order.
    async fn interleave(
        &self,
        router: &Router,
        key: &Key,
        parts: Vec<Part>,
        order: &[usize],
        deadline: Instant,
    ) -> Result<Vec<u8>, End> {
        let mut waiting: Vec<Option<oneshot::Receiver<Vec<Bytes>>>> = Vec::new();
        let mut sent = Vec::with_capacity(parts.len());
        for part in parts {
            waiting.push(Some(part.rx));
            sent.push((
                part.node,
                part.bytes,
                part.count,
                part.follow,
                part.blocking,
            ));
        }
        let mut replies: Vec<std::vec::IntoIter<Bytes>> = Vec::new();
        replies.resize_with(sent.len(), || Vec::new().into_iter());
        let mut taken = vec![0usize; sent.len()];
        let mut out = Vec::new();
        for &i in order {
            let (node, bytes, count, follow, blocking) = sent.get(i).ok_or(End::Failed)?;
            if let Some(rx) = waiting[i].take() {
                let got = self.replies_of(router, rx, *blocking).await?;
                if got.len() != *count as usize {
                    return Err(End::Failed);
                }
                replies[i] = got.into_iter();
            }
            let reply = replies[i].next().ok_or(End::Failed)?;
            let n = taken[i];
            taken[i] += 1;
            let reply = if *follow && redirect::parse(&reply).is_some() {
                let cmd = nth_command(bytes, n).ok_or(End::Failed)?;
                let to = Follow {
                    key,
                    node,
                    blocking: *blocking,
                    deadline,
                };
                self.follow(router, to, cmd, reply).await?
            } else {
                reply
            };
            out.extend_from_slice(&reply);
        }
        Ok(out)
    }

    /// Waits for the replies of commands sent to a master.
    async fn replies_of(
        &self,
        router: &Router,
        rx: oneshot::Receiver<Vec<Bytes>>,
        blocking: bool,
    ) -> Result<Vec<Bytes>, End> {
        let links = self.links;
        let metrics = &links.ctx.metrics;
        let timeout = links.config.upstream.reply_timeout;
        let got = if timeout.is_zero() || blocking {
            rx.await
        } else {
            match tokio::time::timeout(timeout, rx).await {
                Ok(got) => got,
                Err(_) => {
                    if links.ctx.log_throttle.allow() {
                        warn!(timeout = %humantime::format_duration(timeout), "a cluster master did not reply in time; closing the client connection");
                    }
                    metrics.upstream_timeout.increment(1);
                    return Err(End::Failed);
                }
            }
        };
        got.map_err(|_| {
            debug!("a cluster master's connection was lost with replies owed; closing the client");
            metrics.upstream_lost.increment(1);
            router.refresh_soon();
            End::Failed
        })
    }

    /// A connection of the client's own to `node`, in its connection state, for a blocking
    /// command being redirected: on a shared connection it would hold up every command
    /// queued behind it there, and be cut by `upstream.reply_timeout`.
    async fn own_connection(&self, node: &Node) -> Result<Closing, Unavailable> {
        let links = self.links;
        let replay = links.state().replay();
        match node.pools.prepared(&node.cfg, &replay).await {
            Ok(conn) => {
                let epoch = conn.epoch();
                let Some((read, write)) = conn.into_halves() else {
                    return Err(Unavailable::Outage(std::io::Error::other(
                        "a connection to a cluster master could not be split",
                    )));
                };
                let metrics = MuxMetrics {
                    write_commands: links.ctx.metrics.pools.mux.write_commands.clone(),
                    connections: links.ctx.metrics.private_connections.clone(),
                    node_connections: Some(node.connections.clone()),
                };
                Ok(Closing(Mux::start(read, write, metrics, epoch)))
            }
            Err(ConnError::Refused(e)) => Err(Unavailable::Refused(e)),
            Err(ConnError::Io(e)) => Err(Unavailable::Outage(e)),
        }
    }

    /// Follows a redirecting `reply` to `cmd`, first sent to `to.node`, until an answer
    /// comes (or the redirections run out: the client is told the command did not run).
    async fn follow(
        &self,
        router: &Router,
        to: Follow<'_>,
        cmd: &[u8],
        mut reply: Bytes,
    ) -> Result<Bytes, End> {
        let Follow {
            key,
            node,
            blocking,
            deadline,
        } = to;
        let mut node = node.clone();
        let mut redirects = 0;
        let mut backoff = BACKOFF_MIN;
        // Set when the command is to go to `node` as it is (after a node could not be
        // reached, to the slot's master as the map says now), with or without `ASKING`.
        let mut again: Option<bool> = None;
        loop {
            let asking = match again.take() {
                Some(asking) => asking,
                None => {
                    let Some(redirect) = redirect::parse(&reply) else {
                        return Ok(reply);
                    };
                    let kind = match redirect {
                        Redirect::Moved { .. } => 0,
                        Redirect::Ask { .. } => 1,
                        Redirect::TryAgain => 2,
                        Redirect::ClusterDown => 3,
                    };
                    router.metrics.redirects[kind].increment(1);
                    match redirect {
                        Redirect::Moved { slot, to } => {
                            let to = redirect::target(to, &node.address);
                            router.moved(slot, &to);
                            node = router.node(&to);
                            redirects += 1;
                            false
                        }
                        Redirect::Ask { to, .. } => {
                            node = router.node(&redirect::target(to, &node.address));
                            redirects += 1;
                            true
                        }
                        Redirect::TryAgain | Redirect::ClusterDown => {
                            if matches!(redirect, Redirect::ClusterDown) {
                                router.refresh_soon();
                            }
                            if !pause(router, cmd, deadline, &mut backoff, &mut node).await {
                                // Redis's own word that it did not run.
                                return Ok(reply);
                            }
                            false
                        }
                    }
                }
            };
            if redirects > MAX_REDIRECTS {
                return Ok(Bytes::from_static(
                    b"-TRYAGAIN stormwall: the cluster kept redirecting this command (slots moving?); it was not run\r\n",
                ));
            }
            let mut both = Vec::new();
            let (bytes, count) = if asking {
                both.extend_from_slice(ASKING);
                both.extend_from_slice(cmd);
                (&both[..], 2)
            } else {
                (cmd, 1)
            };
            // A blocking command's connection of its own, closed (ending what it carried)
            // once it is answered or the client is gone.
            let mut own = None;
            let sent = if blocking {
                match self.own_connection(&node).await {
                    Ok(conn) => {
                        let rx = conn.0.capture(bytes, count).ok_or_else(|| {
                            Unavailable::Outage(std::io::Error::other("connection lost"))
                        });
                        own = Some(conn);
                        rx
                    }
                    Err(e) => Err(e),
                }
            } else {
                router.send_to(&node, key, bytes, count).await
            };
            let rx = match sent {
                Ok(rx) => rx,
                Err(Unavailable::Refused(e)) => {
                    debug!(error = %e, node = %node.address, "a cluster master refuses this client's connection state; closing the client");
                    return Err(End::Failed);
                }
                Err(Unavailable::Outage(e)) => {
                    // Nothing was sent: once the map names the slot's new master (a
                    // failover under way), it goes there.
                    debug!(error = %e, node = %node.address, "cannot reach a cluster node to redirect to");
                    if !pause(router, cmd, deadline, &mut backoff, &mut node).await {
                        return Err(End::Failed);
                    }
                    again = Some(false);
                    continue;
                }
            };
            let replies = self.replies_of(router, rx, blocking).await?;
            drop(own);
            // After `ASKING`'s `+OK`, the command's own reply.
            reply = replies.last().cloned().ok_or(End::Failed)?;
        }
    }
}

/// Where a redirected command was first sent, and how it is to be followed.
struct Follow<'a> {
    /// The client's connection state when it was sent: resends go to that state's groups.
    key: &'a Key,
    node: &'a Arc<Node>,
    /// A blocking command: resent on a connection of its own, with no reply timeout.
    blocking: bool,
    deadline: Instant,
}

/// A connection of a client's own, closed when dropped (Redis then ends a command blocked
/// on it, as it would for the client's own connection).
struct Closing(Arc<Mux>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Waits `backoff` (doubled for next time) unless that passes `deadline` (false), then
/// points `node` at the master the map gives `cmd`'s slot now, if it gives one.
async fn pause(
    router: &Router,
    cmd: &[u8],
    deadline: Instant,
    backoff: &mut Duration,
    node: &mut Arc<Node>,
) -> bool {
    if Instant::now() + *backoff > deadline {
        return false;
    }
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    let map = router.map();
    if let Some(master) = router
        .slot_of_encoded(cmd)
        .and_then(|s| map.master_of(s))
        .and_then(|i| map.masters().get(i))
    {
        *node = master.clone();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_found_in_a_run() {
        let run = b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nTIME\r\n";
        assert_eq!(nth_command(run, 0), Some(&b"*1\r\n$4\r\nPING\r\n"[..]));
        assert_eq!(
            nth_command(run, 1),
            Some(&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"[..])
        );
        assert_eq!(nth_command(run, 2), Some(&b"*1\r\n$4\r\nTIME\r\n"[..]));
        assert_eq!(nth_command(run, 3), None);
    }
}
