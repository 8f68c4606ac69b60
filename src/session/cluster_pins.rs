//! A cluster client's commands that need a connection of their own: transactions, blocking
//! commands and pub/sub, each on a private connection to the one master that owns their
//! keys.
//!
//! * **Transactions.** `WATCH` opens the client's private connection to the master of its
//!   keys; `MULTI` goes there too, or, without a `WATCH`, to the master of the first key
//!   the transaction names (looked for in what the client already sent after `MULTI`; if
//!   none is there yet, the master its previous command went to). Every command until Redis
//!   says the transaction ended (`EXEC`, `DISCARD`, as its replies confirm) goes on that
//!   connection as the client sent it, and nothing in it is redirected: a node that does
//!   not serve a queued command's slot refuses it (`MOVED`, `CROSSSLOT`), which aborts the
//!   transaction, as Redis Cluster does — a transaction's keys must share one slot.
//!   Identity commands inside a transaction (`AUTH`, `HELLO`, `CLIENT`) would change the
//!   private connection only: a command Redis does not know is queued in their place, so
//!   Redis refuses it and aborts the transaction, and its name says why.
//! * **Blocking commands** (`BLPOP`, `BLMOVE`, `XREAD … BLOCK`, `WAIT`, …) go on the
//!   private connection to the master of their keys, with no reply timeout; commands the
//!   client sends after one follow it on that connection until it is answered (as Redis
//!   runs them after it), redirected if their keys are elsewhere. `WAIT`/`WAITAOF` go to the
//!   master the client's previous command went to, after a write of stormwall's own there
//!   that makes them count the client's earlier writes (see `sharing::write_barrier`).
//! * **Pub/sub and `MONITOR`** move the client, for the rest of its life, to a private
//!   connection relayed as it comes: `SUBSCRIBE`/`PSUBSCRIBE` (cluster-wide in Redis Cluster)
//!   to any master, `SSUBSCRIBE` to the master of its channel's slot.
//!
//! The client's commands switch between its private connection and the shared ones only
//! once everything it sent before has been answered, so they run in its order. A private
//! connection that fails while it carries a transaction, a watch or a blocked command
//! closes the client, as a standalone Redis's failure would; one that fails idle is
//! reopened when next needed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::time::Instant;
use tracing::debug;

use super::cluster::{ClusterLink, plan};
use super::dispatch::{Dispatch, Merge, Part};
use super::link::Upstream;
use super::queue::{Entry, Private as Switched};
use super::requests::{Next, RequestSide};
use super::sharing::{self, Action, PinReason};
use super::state::{Effect, Login};
use crate::cluster::keys::Keys;
use crate::cluster::route::{self, Route};
use crate::cluster::router::{Node, Router};
use crate::policy::Kind;
use crate::resp::request::{Command, Parsed, RequestLimits, RequestParser};
use crate::upstream::mux::{Mux, MuxMetrics};

/// Commands after `MULTI` looked through for the transaction's first key.
const LOOKAHEAD: usize = 64;

/// A cluster client's connection of its own to one master.
pub(super) struct PrivateConn {
    pub node: Arc<Node>,
    pub mux: Arc<Mux>,
    /// Replies owed on it (counted down by the reply side).
    pub owed: Arc<AtomicU32>,
}

impl Drop for PrivateConn {
    fn drop(&mut self) {
        // Redis ends what the connection carried (a blocked command, watches) with it.
        self.mux.close();
    }
}

/// Which master a private command goes to.
#[derive(Debug, Clone, Copy)]
pub(super) enum Where {
    /// The master of this slot (`None`: the one the previous command went to), unless the
    /// private connection carries a transaction, watches or a blocked command: then that
    /// connection's.
    Slot(Option<u16>),
    /// The private connection's master (any, if there is none).
    Current,
}

/// A command for the client's private connection.
pub(super) struct Private {
    to: Where,
    /// What is sent: the command (re-encoded), or a substitute Redis refuses.
    bytes: Vec<u8>,
    effect: Option<Effect>,
    blocking: bool,
    /// `WAIT`/`WAITAOF`: stormwall's write first.
    barrier: bool,
    /// Outside a transaction: redirections are followed.
    follow: bool,
    opens: bool,
    closes: bool,
}

/// What a cluster client's command needs.
pub(super) enum Step {
    /// Routed by its keys over the shared connections.
    Route(super::cluster::Plan),
    Private(Private),
    /// Pub/sub or `MONITOR`: a private connection for life, to this slot's master (`None`:
    /// any).
    Pin(Option<u16>, PinReason),
    /// `RESET`: checked on a spare, as a login is, the private connection dropped.
    Reset,
    /// Not supported in front of a cluster, and why.
    Refuse(&'static str),
    /// Handled as for a standalone shared client.
    AsShared,
}

impl Private {
    /// A command that follows a blocked one on the private connection.
    pub(super) fn behind(cmd: &Command<'_>) -> Private {
        Private {
            to: Where::Current,
            bytes: encoded(cmd),
            effect: None,
            blocking: false,
            barrier: false,
            follow: true,
            opens: false,
            closes: false,
        }
    }
}

/// A cluster client's command, as the request side read it.
#[derive(Clone, Copy)]
pub(super) struct Asked<'c, 'a> {
    pub kind: Kind,
    /// What shared mode's command table says it needs.
    pub action: Action,
    /// The state change it asks for (`AUTH`, `HELLO`, `SELECT`, …).
    pub effect: Option<&'c Effect>,
    pub cmd: &'c Command<'a>,
    /// Sent inline: re-encoded before it goes to a master.
    pub inline: bool,
}

fn encoded(cmd: &Command<'_>) -> Vec<u8> {
    let args: Vec<&[u8]> = (0..cmd.argc()).filter_map(|i| cmd.arg(i)).collect();
    let mut out = Vec::new();
    crate::resp::encode_command(&mut out, &args);
    out
}

fn name_is(cmd: &Command<'_>, name: &[u8]) -> bool {
    cmd.arg(0).is_some_and(|n| n.eq_ignore_ascii_case(name))
}

/// The slot all of `cmd`'s keys (or sharded channels) hash to; the first key's if they
/// are in several (the master of that one refuses it in Redis's words).
fn first_slot(router: &Router, cmd: &Command<'_>) -> Option<u16> {
    match router.command_keys()?.hashed(cmd) {
        Keys::Found(keys) => keys.names().next().map(crate::cluster::slot::key_slot),
        _ => None,
    }
}

/// Sent in place of an identity command inside a cluster transaction: Redis does not know
/// it, so it refuses it and aborts the transaction, and the name says why.
const NO_IDENTITY_IN_MULTI: &[u8] =
    b"*1\r\n$63\r\nstormwall:AUTH-HELLO-CLIENT-inside-MULTI-unsupported-on-cluster\r\n";

impl ClusterLink {
    /// Decides what a command needs (`action` as shared mode reads it);
    /// `after` is what the client sent after it, looked through for a transaction's key;
    /// `watching`: Redis confirmed a `WATCH` the client has not ended.
    pub(super) fn decide(&self, asked: &Asked<'_, '_>, after: &[u8], watching: bool) -> Step {
        let Asked {
            kind,
            action,
            cmd,
            inline,
            ..
        } = *asked;
        let router = &self.router;
        let private = |to, effect: Option<Effect>| Private {
            to,
            bytes: encoded(cmd),
            effect,
            blocking: false,
            barrier: false,
            follow: false,
            opens: false,
            closes: false,
        };
        if self.txn_open {
            return match kind {
                Kind::Exec => Step::Private(Private {
                    closes: true,
                    ..private(Where::Current, Some(Effect::Exec))
                }),
                Kind::Discard => Step::Private(Private {
                    closes: true,
                    ..private(Where::Current, Some(Effect::Discard))
                }),
                Kind::Quit => Step::AsShared,
                Kind::Reset => Step::Reset,
                _ if matches!(action, Action::Login | Action::Name | Action::GetName)
                    || name_is(cmd, b"CLIENT") =>
                {
                    Step::Private(Private {
                        bytes: NO_IDENTITY_IN_MULTI.to_vec(),
                        ..private(Where::Current, None)
                    })
                }
                _ => Step::Private(private(Where::Current, None)),
            };
        }
        match (kind, action) {
            (Kind::Multi, _) => {
                // Watches live on the private connection: the transaction goes with them.
                let to = if watching {
                    Where::Current
                } else {
                    Where::Slot(self.first_key_after(after))
                };
                Step::Private(Private {
                    opens: true,
                    ..private(to, Some(Effect::Multi))
                })
            }
            (Kind::Exec | Kind::Discard, _) if self.private.is_none() => {
                // No transaction anywhere: a master says so.
                Step::Route(plan(router, cmd, inline))
            }
            (Kind::Exec, _) => Step::Private(private(Where::Current, Some(Effect::Exec))),
            (Kind::Discard, _) => Step::Private(private(Where::Current, Some(Effect::Discard))),
            (Kind::Reset, _) => Step::Reset,
            _ if name_is(cmd, b"WATCH") => Step::Private(private(
                Where::Slot(first_slot(router, cmd)),
                Some(Effect::Watch),
            )),
            _ if name_is(cmd, b"UNWATCH") && self.private.is_none() => {
                Step::Route(plan(router, cmd, inline))
            }
            _ if name_is(cmd, b"UNWATCH") => {
                Step::Private(private(Where::Current, Some(Effect::Unwatch)))
            }
            (_, Action::Pin(PinReason::Blocking)) => {
                let barrier = sharing::counts_earlier_writes(cmd);
                let to = if barrier {
                    Where::Slot(None)
                } else {
                    Where::Slot(first_slot(router, cmd))
                };
                Step::Private(Private {
                    blocking: true,
                    barrier,
                    follow: true,
                    ..private(to, None)
                })
            }
            (_, Action::Pin(PinReason::PubSub)) => Step::Pin(
                if name_is(cmd, b"SSUBSCRIBE") || name_is(cmd, b"SUNSUBSCRIBE") {
                    first_slot(router, cmd)
                } else {
                    None
                },
                PinReason::PubSub,
            ),
            (_, Action::Pin(PinReason::Monitor)) => Step::Pin(None, PinReason::Monitor),
            _ => Step::AsShared,
        }
    }

    /// The slot of the first keyed command among the complete ones in `after` (up to
    /// `EXEC`/`DISCARD`).
    fn first_key_after(&self, after: &[u8]) -> Option<u16> {
        let keys = self.router.command_keys()?;
        let mut parser = RequestParser::new(RequestLimits {
            max_bulk_len: u64::MAX,
            max_array_len: crate::resp::request::MAX_MULTIBULK,
            max_request_bytes: u64::MAX,
        });
        let mut rest = after;
        for _ in 0..LOOKAHEAD {
            let Ok(Some(parsed)) = parser.parse(rest) else {
                return None;
            };
            let len = parsed.len();
            let found = match &parsed {
                Parsed::Empty { .. } => None,
                Parsed::Inline { args, .. } => slot_of(&keys, &Command::Inline { args }),
                Parsed::Multibulk { .. } => slot_of(&keys, &parser.command(rest)),
            };
            let ends = match &parsed {
                Parsed::Inline { args, .. } => ends_transaction(&Command::Inline { args }),
                Parsed::Multibulk { .. } => ends_transaction(&parser.command(rest)),
                Parsed::Empty { .. } => false,
            };
            if found.is_some() {
                return found;
            }
            if ends {
                return None;
            }
            rest = &rest[len..];
        }
        None
    }

    /// Whether a private connection is in use: a transaction, watches, or replies owed.
    fn private_busy(&self, watching: bool) -> bool {
        self.txn_open
            || watching
            || self
                .private
                .as_ref()
                .is_some_and(|p| p.owed.load(Ordering::Acquire) > 0)
    }

    /// Whether the previous command's reply is still owed on the private connection (a
    /// blocked command): later commands follow it there.
    pub(super) fn behind_private(&self) -> bool {
        self.private
            .as_ref()
            .is_some_and(|p| p.owed.load(Ordering::Acquire) > 0)
    }

    /// Closes the private connection (the session ends, or it is no longer wanted).
    pub(super) fn drop_private(&mut self) {
        self.private = None;
        self.txn_open = false;
        self.txn_closing = false;
    }
}

fn slot_of(keys: &crate::cluster::keys::CommandKeys, cmd: &Command<'_>) -> Option<u16> {
    match route::route(cmd, Some(keys)) {
        Route::Slot(slot) => Some(slot),
        _ => None,
    }
}

fn ends_transaction(cmd: &Command<'_>) -> bool {
    name_is(cmd, b"EXEC") || name_is(cmd, b"DISCARD")
}

/// What a cluster client's command needs: shared mode's [`Action`] and the state change it
/// asks for, read for a cluster (`session::cluster`, `session::cluster_pins`). `after` is
/// what the client sent after it.
pub(super) fn step(
    link: &ClusterLink,
    asked: &Asked<'_, '_>,
    after: &[u8],
    watching: bool,
) -> Step {
    let Asked {
        action,
        effect,
        cmd,
        inline,
        ..
    } = *asked;
    let route = || plan(&link.router, cmd, inline);
    let step = match link.decide(asked, after, watching) {
        Step::AsShared => match (action, effect) {
            // A cluster has database 0 only: a master accepts `SELECT 0` and refuses the
            // rest in Redis Cluster's own words, and the client's state does not change.
            (_, Some(Effect::Select(_))) | (Action::Share | Action::Select, _) => {
                Step::Route(route())
            }
            (
                _,
                Some(Effect::Login {
                    login: Login::Untracked,
                    ..
                }),
            ) => Step::Refuse("credentials longer than 4096 bytes"),
            // A command Redis does not know either: a master says so.
            (Action::Pin(PinReason::Unknown), _)
                if link.router.command_keys().is_some_and(|keys| {
                    keys.keys(cmd) == crate::cluster::keys::Keys::UnknownCommand
                }) =>
            {
                Step::Route(route())
            }
            (Action::Pin(_), _) => Step::Refuse("it needs a connection of its own to one server"),
            (Action::PinIfAccepted(PinReason::ConnectionFlag), _) => {
                Step::Refuse("commands go to the masters")
            }
            _ => Step::AsShared,
        },
        other => other,
    };
    match step {
        // Behind a blocked command on the private connection, as Redis would run it. What
        // stormwall splits or sends to several masters cannot go there (one master would
        // answer for all of them): it waits until the blocked command is answered, as the
        // client's commands after a blocked one wait on one Redis.
        Step::Route(super::cluster::Plan::Forward(_)) if link.behind_private() => {
            Step::Private(Private::behind(cmd))
        }
        step => step,
    }
}

/// First and longest pause before trying again to open a private connection.
const BACKOFF_MIN: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl RequestSide<'_> {
    /// Brings what Redis said about the client's transaction up to date: after an
    /// `EXEC`/`DISCARD`, once it is answered; after a `MULTI`, whenever everything is.
    pub(super) async fn cluster_sync(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
    ) -> Next {
        let Upstream::Cluster(link) = upstream else {
            return Next::Read;
        };
        if link.txn_closing {
            if let Next::Stop = self.forward(upstream, buf, *scanned).await {
                return Next::Stop;
            }
            *scanned = 0;
            tokio::select! {
                _ = self.links.queue.drained() => {}
                _ = self.links.dead.cancelled() => return Next::Stop,
            }
        } else if !(link.txn_open && self.links.queue.is_drained()) {
            return Next::Read;
        }
        let Upstream::Cluster(link) = upstream else {
            return Next::Read;
        };
        link.txn_open = self.links.state().in_multi;
        link.txn_closing = false;
        Next::Read
    }

    /// Sends a command on the client's private connection (the command at
    /// `buf[*scanned..][..len]`, after what is framed).
    pub(super) async fn cluster_private(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        len: usize,
        command: Private,
    ) -> Next {
        if let Next::Stop = self.forward(upstream, buf, *scanned).await {
            return Next::Stop;
        }
        *scanned = 0;
        buf.advance(len);
        let links = self.links;
        let Upstream::Cluster(link) = upstream else {
            return Next::Stop;
        };
        // Commands switch connections only once everything before is answered.
        if !link.on_private {
            tokio::select! {
                _ = links.queue.drained() => {}
                _ = links.dead.cancelled() => return Next::Stop,
            }
        }
        let watching = links.state().watching;
        if link.map_is_stale() && !link.private_busy(watching) && links.queue.is_drained() {
            // Nothing in flight: route by the router's current map, so the private
            // connection goes to the master that serves the slot now rather than to one a
            // `MOVED` would send it away from.
            link.renew();
        }
        if !self.private_for(link, command.to, watching).await {
            return Next::Stop;
        }
        let Some(private) = link.private.as_ref() else {
            return Next::Stop;
        };
        let mut bytes = command.bytes;
        let mut count = 1;
        if command.barrier {
            // The write that makes `WAIT` count the client's earlier writes here.
            let mut out = Vec::new();
            crate::resp::encode_command(&mut out, &sharing::write_barrier());
            out.extend_from_slice(&bytes);
            bytes = out;
            count = 2;
        }
        private.owed.fetch_add(count, Ordering::AcqRel);
        let Some(rx) = private.mux.capture(&bytes, count) else {
            debug!("a cluster client's private connection failed; closing the client");
            links.dead.cancel();
            return Next::Stop;
        };
        private.node.commands.increment(u64::from(count));
        let node = private.node.clone();
        let owed = private.owed.clone();
        let part = Part {
            node,
            bytes: Bytes::from(bytes),
            count,
            rx,
            follow: command.follow,
            blocking: command.blocking,
            owed: Some(owed),
        };
        let merge = if command.barrier {
            Merge::Last
        } else {
            Merge::Each
        };
        link.on_private = true;
        if command.opens {
            link.txn_open = true;
        }
        if command.closes || matches!(command.effect, Some(Effect::Exec | Effect::Discard)) {
            link.txn_closing = true;
        }
        self.links.ctx.metrics.passthrough.increment(1);
        let dispatch =
            Dispatch::new(vec![part], merge, link.key().clone()).confirming(command.effect);
        self.enqueue(Entry::Cluster(Box::new(dispatch))).await;
        Next::Read
    }

    /// Makes `link.private` the client's private connection for a command going `to`:
    /// opened (in the client's state) or moved to another master if needed. False if the
    /// client is to be closed.
    async fn private_for(&self, link: &mut ClusterLink, to: Where, watching: bool) -> bool {
        let links = self.links;
        let deadline = Instant::now() + links.config.upstream.outage_wait;
        let mut backoff = BACKOFF_MIN;
        loop {
            let busy = link.private_busy(watching);
            if link.private.as_ref().is_some_and(|p| p.mux.is_dead()) {
                if busy {
                    debug!(
                        "a cluster client's private connection failed with a transaction, watches or a reply on it; closing the client"
                    );
                    links.dead.cancel();
                    return false;
                }
                link.private = None;
            }
            // A busy connection stays where it is: Redis refuses what is not its own.
            let want = match (to, &link.private) {
                (_, None) => link.master_node(match to {
                    Where::Slot(slot) => slot,
                    Where::Current => None,
                }),
                (Where::Slot(slot), Some(_)) if !busy => link.master_node(slot),
                _ => None,
            };
            if let (Some(want), Some(p)) = (&want, &link.private)
                && !Arc::ptr_eq(want, &p.node)
            {
                link.private = None;
            }
            if link.private.is_some() {
                return true;
            }
            let Some(node) = want else {
                debug!("no cluster master known for a private connection; closing the client");
                links.dead.cancel();
                return false;
            };
            let replay = links.state().replay();
            match node.pools.prepared(&node.cfg, &replay).await {
                Ok(conn) => {
                    let epoch = conn.epoch();
                    let Some((read, write)) = conn.into_halves() else {
                        links.dead.cancel();
                        return false;
                    };
                    let metrics = MuxMetrics {
                        write_commands: links.ctx.metrics.pools.mux.write_commands.clone(),
                        connections: links.ctx.metrics.private_connections.clone(),
                        node_connections: Some(node.connections.clone()),
                    };
                    link.private = Some(PrivateConn {
                        node,
                        mux: Mux::start(read, write, metrics, epoch),
                        owed: Arc::new(AtomicU32::new(0)),
                    });
                    return true;
                }
                Err(crate::upstream::ConnError::Refused(e)) => {
                    debug!(error = %e, "a cluster master refuses this client's state on a private connection; closing the client");
                    links.dead.cancel();
                    return false;
                }
                Err(crate::upstream::ConnError::Io(e)) => {
                    link.router.refresh_soon();
                    if Instant::now() + backoff > deadline {
                        debug!(error = %e, "no private connection to a cluster master within upstream.outage_wait; closing the client");
                        links.dead.cancel();
                        return false;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = links.dead.cancelled() => return false,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    if link.map_is_stale() {
                        tokio::select! {
                            _ = links.queue.drained() => {}
                            _ = links.dead.cancelled() => return false,
                        }
                        link.renew();
                    }
                }
            }
        }
    }

    /// Pub/sub or `MONITOR`: the client moves, for the rest of its life, to a private
    /// connection to the master of `slot` (any master for `None`), relayed as it comes
    /// once the command is framed again on it.
    pub(super) async fn cluster_pin(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut super::requests::Run,
        slot: Option<u16>,
        reason: PinReason,
    ) -> Next {
        if let Next::Stop = self.drain_shared(upstream, buf, scanned, run).await {
            return Next::Stop;
        }
        let links = self.links;
        let Upstream::Cluster(link) = upstream else {
            return Next::Stop;
        };
        link.drop_private();
        if link.map_is_stale() {
            // Everything before was answered: the master that serves the slot now.
            link.renew();
        }
        let Some(node) = link.master_node(slot) else {
            links.dead.cancel();
            return Next::Stop;
        };
        let replay = links.state().replay();
        let conn = match node.pools.prepared(&node.cfg, &replay).await {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = ?e, reason = reason.label(), "cannot open a private connection to a cluster master for a pinned client; closing it");
                links.dead.cancel();
                return Next::Stop;
            }
        };
        let Some((read, write)) = conn.into_halves() else {
            links.dead.cancel();
            return Next::Stop;
        };
        debug!(reason = reason.label(), node = %node.address, "cluster client moves to a private connection");
        links.ctx.metrics.pins[reason as usize].increment(1);
        links.ctx.metrics.private_connections.increment(1.0);
        links
            .pinned
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.enqueue(Entry::Switch(Switched(read))).await;
        *upstream = Upstream::Socket(write);
        Next::Read
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_substitute_is_one_well_framed_command() {
        let commands = crate::resp::request::decode_commands(NO_IDENTITY_IN_MULTI);
        assert_eq!(
            commands,
            Some(vec![vec![
                b"stormwall:AUTH-HELLO-CLIENT-inside-MULTI-unsupported-on-cluster".to_vec()
            ]])
        );
    }
}
