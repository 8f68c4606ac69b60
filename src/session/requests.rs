//! The request side of a session: client bytes in, framed and classified, forwarded to
//! Redis exactly as they came — or, for a governed invalidation, handed to the engine.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::cluster;
use super::cluster_pins::{self, Step};
use super::link::Upstream;
use super::queue::{Entry, Private};
use super::sharing::{self, Action, PinReason};
use super::state::{Effect, InfoField, Login, MAX_KEPT_PASSWORD};
use super::{Links, MIN_READ, READ_BUF};
use crate::config::FlushCommand;
use crate::invalidation::{self, Engine, Observed, Request, Scope, Verdict};
use crate::net::ReadHalf;
use crate::policy::{self, Kind};
use crate::resp::request::{Command, Parsed, RequestLimits, RequestParser};
use crate::resp::{ProtocolError, parse_int};
use crate::upstream::Conn;
use crate::upstream::mux::INBOX_PAUSE;
use crate::upstream::pool::Key;

pub(super) struct RequestSide<'a> {
    pub links: &'a Links<'a>,
    pub parser: RequestParser,
    /// A `MULTI` was sent and Redis may not have ended the transaction yet: commands whose
    /// handling depends on it (entering pub/sub, no-reply commands) wait for the answer.
    pub maybe_multi: bool,
    /// A command that enters raw relaying was queued in the open transaction; its `EXEC`
    /// switches the connection to raw (conservatively, whatever `EXEC` answers).
    pub multi_enters_raw: bool,
    /// Replies are relayed raw from here on; requests are still framed so that denied
    /// flushes stay denied.
    pub raw: bool,
    /// Framing gave up (bad input in raw mode): bytes go to Redis as they come, and Redis,
    /// which frames them the same way, answers and closes.
    pub unframed: bool,
    /// When the bytes being processed were read (for the overhead histogram).
    pub read_at: Instant,
    /// Replies owed for entries queued since the last write to Redis: the next write
    /// carries exactly those commands, and a shared connection routes that many replies
    /// back to this client.
    pub unsent: AtomicU32,
}

/// Inline requests longer than this (Redis's `PROTO_INLINE_MAX_SIZE`) go on re-encoded.
const LONG_INLINE: usize = 64 * 1024;

/// How long a client that stopped in the middle of a line over 64 KiB may pause before the
/// line is judged as Redis judges it at the end of a read (refused).
const LINE_PAUSE: Duration = Duration::from_millis(50);

/// Whether everything sent before has been answered.
enum Settled {
    Yes,
    /// The client is not reading the replies already owed (it writes a whole pipeline
    /// before reading), so waiting for them could wait forever.
    NotYet,
    /// The session is ending.
    Stop,
}

/// Whether the request side keeps reading after processing a buffer.
pub(super) enum Next {
    Read,
    Stop,
}

impl Next {
    fn is_stop(&self) -> bool {
        matches!(self, Next::Stop)
    }
}

/// Commands framed so far in the current buffer and not yet queued.
#[derive(Default)]
pub(super) struct Run {
    count: u32,
    blocking: bool,
}

/// Most requests in one group: a pipeline of thousands of deletes goes in several groups,
/// so no client holds a large share of the queue at once.
const MAX_GROUP: usize = 1000;

/// Governed requests framed back to back and not yet handed to the engine: they go to it
/// together, so a pipeline of deletes becomes one batch rather than one batch (and one round
/// trip) per request. Any other command ends the group, and the group runs before it (G3).
#[derive(Default)]
struct Group {
    requests: Vec<Request>,
    /// Each request's bytes in the client's stream.
    lens: Vec<usize>,
    bytes: usize,
    keys: usize,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Whether `request` may go with the requests already here: the same kind (deletes, or
    /// flushes of the same target, which go to one worker in order), and within the queue's
    /// bounds (a group is admitted as a whole, so it must fit the queue on its own).
    fn joins(&self, request: &Request, limits: &crate::config::InvalidationConfig) -> bool {
        let Some(first) = self.requests.first() else {
            return true;
        };
        let same = match (first, request) {
            (Request::Delete { .. }, Request::Delete { .. }) => true,
            (Request::Flush { all: a, .. }, Request::Flush { all: b, .. }) => a == b,
            _ => false,
        };
        same && self.requests.len() < MAX_GROUP.min(limits.max_pending)
            && self.keys + request.keys() <= limits.max_pending_keys
    }

    fn push(&mut self, len: usize, request: Request) {
        self.bytes += len;
        self.keys += request.keys();
        self.lens.push(len);
        self.requests.push(request);
    }

    /// Adds bytes Redis ignores (an empty line) to the last request's, if there is one.
    fn pad(&mut self, len: usize) {
        if let Some(last) = self.lens.last_mut() {
            *last += len;
            self.bytes += len;
        }
    }
}

impl RequestSide<'_> {
    pub(super) async fn run(mut self, mut client: ReadHalf, upstream: &mut Upstream) {
        let links = self.links;
        let idle = links.config.listen.idle_timeout;
        // Lent only while it holds bytes (crate::buffers).
        let mut buf = BytesMut::new();
        // Registered once: polling a fresh `cancelled()` per command would take the token's
        // lock twice per command, and the shutdown token is shared by every session.
        let dead = links.dead.cancelled();
        let shutdown = links.shutdown.cancelled();
        tokio::pin!(dead, shutdown);
        loop {
            // Stopped in a line over 64 KiB: Redis refuses it if the client sends no more,
            // so wait only briefly before judging it (resp::request::set_caught_up).
            let judge = self.parser.awaits_line_end();
            let wait = if judge { LINE_PAUSE } else { idle };
            let read = tokio::select! {
                biased;
                _ = &mut dead => return,
                _ = &mut shutdown => return,
                r = read_within(&mut client, &mut buf, wait) => r,
            };
            if judge && read.is_none() {
                self.parser.set_caught_up(true);
                let next = self.consume(upstream, &mut buf).await;
                self.parser.set_caught_up(false);
                if let Next::Stop = next {
                    return;
                }
                continue;
            }
            let Some(read) = read else {
                if self.raw || !links.queue.is_drained() {
                    continue;
                }
                debug!("closing idle client");
                return;
            };
            match read {
                Ok(0) => {
                    // Redis's last read ended where the client's bytes did: a line over
                    // 64 KiB left unfinished there is refused before the EOF is seen.
                    if self.parser.awaits_line_end() {
                        self.parser.set_caught_up(true);
                        if let Next::Stop = self.consume(upstream, &mut buf).await {
                            return;
                        }
                    }
                    // Redis treats a client's EOF as the end of the connection (dropping a
                    // blocked BLPOP, say); passing the EOF on makes it do just that.
                    links.client_gone.store(true, Ordering::Release);
                    upstream.shutdown().await;
                    return;
                }
                Ok(_) => self.read_at = Instant::now(),
                Err(e) => {
                    debug!(error = %e, "client read failed");
                    links.client_gone.store(true, Ordering::Release);
                    upstream.shutdown().await;
                    return;
                }
            }
            let next = self.consume(upstream, &mut buf).await;
            if let Next::Stop = next {
                return;
            }
        }
    }

    /// Handles what was read, framed (or, in raw mode, relayed).
    async fn consume(&mut self, upstream: &mut Upstream, buf: &mut BytesMut) -> Next {
        if self.raw {
            self.process_raw(upstream, buf).await
        } else {
            self.process(upstream, buf).await
        }
    }

    /// Frames every complete command in `buf`, queues their entries, and forwards them.
    async fn process(&mut self, upstream: &mut Upstream, buf: &mut BytesMut) -> Next {
        let mut scanned = 0;
        let mut run = Run::default();
        let pin = match upstream {
            // Replies pile up unread: Redis, not stormwall, should hold the rest.
            Upstream::Shared(link) if link.inbox.held() > INBOX_PAUSE => {
                Some(PinReason::UnreadReplies)
            }
            // Its next large replies would hold up other clients' behind them.
            Upstream::Shared(link) if link.inbox.got_large_reply() => Some(PinReason::LargeReplies),
            _ => None,
        };
        if let Some(reason) = pin {
            let pin = self.pin(upstream, buf, &mut scanned, &mut run, reason, false);
            if let Next::Stop = Box::pin(pin).await {
                return Next::Stop;
            }
        }
        self.parser
            .set_unauthenticated(self.links.unauthenticated());
        // Governed requests framed right after one another, at `buf[scanned..][..group.bytes]`.
        let mut group = Group::default();
        // Observe mode: the kind of the governed command framed just before, if the one
        // before was one (a pipeline enforcement would have batched together).
        let mut last_observed: Option<Observed> = None;
        loop {
            let parsed = match self.parser.parse(&buf[scanned + group.bytes..]) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                // Whatever else comes, the governed requests before it run first (G3).
                Err(e) if !group.is_empty() => {
                    // The parser forgets the bad request; after the group it is framed again.
                    self.parser.reset();
                    let flush = self.invalidate(upstream, buf, &mut scanned, &mut run, &mut group);
                    if Box::pin(flush).await.is_stop() {
                        return Next::Stop;
                    }
                    drop(e);
                    continue;
                }
                Err(e)
                    if e.text().starts_with("unauthenticated")
                        && !self.links.queue.is_drained() =>
                {
                    // An AUTH earlier in this write may authenticate the client first, as
                    // Redis, reading in order, would have by now: find out, then judge again.
                    self.parser.reset();
                    if let Settled::Stop =
                        Box::pin(self.settle(upstream, buf, &mut scanned, &mut run)).await
                    {
                        return Next::Stop;
                    }
                    let unauthenticated = self.links.unauthenticated();
                    self.parser.set_unauthenticated(unauthenticated);
                    if unauthenticated {
                        return Box::pin(self.protocol_error(upstream, buf, scanned, run, e)).await;
                    }
                    continue;
                }
                Err(e) => {
                    return Box::pin(self.protocol_error(upstream, buf, scanned, run, e)).await;
                }
            };
            let cmd = match &parsed {
                Parsed::Empty { len } => {
                    // Redis skips it: it may as well travel with the governed request before it.
                    group.pad(*len);
                    if group.is_empty() {
                        scanned += len;
                    }
                    continue;
                }
                Parsed::Multibulk { .. } => self.parser.command(&buf[scanned + group.bytes..]),
                Parsed::Inline { args, .. } => Command::Inline { args },
            };
            let kind = policy::classify(&cmd);
            let len = parsed.len();
            // Observe mode: it passes through as if the shield were off, and is counted.
            let observed = self.observed(kind);
            if let Some(command) = observed {
                let follows = last_observed.is_some_and(|last| same_batch(last, command));
                self.observe(command, &cmd, follows);
            }
            last_observed = observed;
            let denial = self.denial(kind);
            let governed = match kind {
                // Whether Redis would queue it in a transaction is not known yet: decided below.
                _ if observed.is_some() => None,
                _ if self.maybe_multi || denial.is_some() || !self.governs() => None,
                // Inside a cluster client's transaction (or behind its blocked command):
                // on its private connection, as it came.
                _ if matches!(upstream, Upstream::Cluster(l) if l.txn_open || l.behind_private()) => {
                    None
                }
                Kind::Flush { all, sync } => Some(Request::Flush { all, sync }),
                Kind::Delete => Some(Request::Delete {
                    unlink: cmd
                        .arg(0)
                        .is_some_and(|n| n.eq_ignore_ascii_case(b"UNLINK")),
                    keys: (1..cmd.argc())
                        .filter_map(|i| cmd.arg(i))
                        .map(Bytes::copy_from_slice)
                        .collect(),
                }),
                _ => None,
            };
            if let Some(request) = governed {
                if !group.joins(&request, &self.links.config.invalidation) {
                    let flush = self.invalidate(upstream, buf, &mut scanned, &mut run, &mut group);
                    if Box::pin(flush).await.is_stop() {
                        return Next::Stop;
                    }
                }
                group.push(len, request);
                continue;
            }
            if !group.is_empty() {
                let flush = self.invalidate(upstream, buf, &mut scanned, &mut run, &mut group);
                if Box::pin(flush).await.is_stop() {
                    return Next::Stop;
                }
            }
            if let Upstream::Cluster(_) = upstream {
                // What Redis said of the client's transaction, before deciding where this
                // command goes.
                let sync = self.cluster_sync(upstream, buf, &mut scanned);
                if let Next::Stop = Box::pin(sync).await {
                    return Next::Stop;
                }
            }
            let cmd = match &parsed {
                Parsed::Inline { args, .. } => Command::Inline { args },
                _ => self.parser.command(&buf[scanned..]),
            };
            if let Some(denial) = denial {
                drop(parsed);
                let next =
                    Box::pin(self.substitute(upstream, buf, &mut scanned, &mut run, len, denial))
                        .await;
                if let Next::Stop = next {
                    return Next::Stop;
                }
                continue;
            }
            if let Upstream::Shared(_) | Upstream::Cluster(_) = upstream {
                let action = sharing::action(kind, &cmd);
                let effect = match action {
                    Action::Login | Action::Select => Some(effect_of(&cmd)),
                    Action::Name => client_info(&cmd),
                    _ => None,
                };
                let action = match &effect {
                    Some(Effect::Login {
                        login: Login::Untracked,
                        ..
                    })
                    | Some(Effect::Select(None)) => Action::Pin(PinReason::UntrackedState),
                    _ => action,
                };
                let step = match upstream {
                    Upstream::Cluster(link) => {
                        let inline = matches!(parsed, Parsed::Inline { .. });
                        let watching = self.links.state().watching;
                        let after = &buf[scanned + len..];
                        let asked = cluster_pins::Asked {
                            kind,
                            action,
                            effect: effect.as_ref(),
                            cmd: &cmd,
                            inline,
                        };
                        cluster_pins::step(link, &asked, after, watching)
                    }
                    _ => Step::AsShared,
                };
                if !matches!(step, Step::AsShared) {
                    let name =
                        String::from_utf8_lossy(cmd.arg(0).unwrap_or_default()).to_uppercase();
                    drop(parsed);
                    let next = match step {
                        Step::Route(plan) => {
                            Box::pin(self.cluster(upstream, buf, &mut scanned, len, plan)).await
                        }
                        Step::Private(command) => {
                            let private =
                                self.cluster_private(upstream, buf, &mut scanned, len, command);
                            Box::pin(private).await
                        }
                        Step::Pin(slot, reason) => {
                            // Judged again, now on the client's own connection.
                            let pin = self.cluster_pin(
                                upstream,
                                buf,
                                &mut scanned,
                                &mut run,
                                slot,
                                reason,
                            );
                            Box::pin(pin).await
                        }
                        Step::Reset => {
                            if let Upstream::Cluster(link) = upstream {
                                link.drop_private();
                            }
                            let effect = Some(Effect::Reset {
                                auth_required: self.links.ctx.auth_required.load(Ordering::Relaxed),
                            });
                            Box::pin(self.login(upstream, buf, &mut scanned, &mut run, len, effect))
                                .await
                        }
                        Step::Refuse(why) => {
                            let reply = crate::resp::error_reply(&format!(
                                "ERR stormwall: {name} is not supported with a Redis Cluster upstream ({why})"
                            ));
                            let answer =
                                self.answer(upstream, buf, &mut scanned, &mut run, len, reply);
                            Box::pin(answer).await
                        }
                        Step::AsShared => Next::Read,
                    };
                    match next {
                        Next::Read => continue,
                        Next::Stop => return Next::Stop,
                    }
                }
                if action != Action::Share {
                    let barrier = matches!(action, Action::Pin(PinReason::Blocking))
                        && sharing::counts_earlier_writes(&cmd);
                    drop(parsed);
                    let next = match action {
                        // Judged again, now on the client's own connection.
                        Action::Pin(reason) => {
                            let pin =
                                self.pin(upstream, buf, &mut scanned, &mut run, reason, barrier);
                            Box::pin(pin).await
                        }
                        Action::PinIfAccepted(reason) => {
                            let trial = self.pin_if_accepted(
                                upstream,
                                buf,
                                &mut scanned,
                                &mut run,
                                len,
                                reason,
                            );
                            Box::pin(trial).await
                        }
                        Action::Login => {
                            Box::pin(self.login(upstream, buf, &mut scanned, &mut run, len, effect))
                                .await
                        }
                        Action::GetName => {
                            let get = self.get_name(upstream, buf, &mut scanned, &mut run, len);
                            Box::pin(get).await
                        }
                        Action::Share | Action::Select | Action::Name => {
                            Box::pin(self.checked(
                                upstream,
                                buf,
                                &mut scanned,
                                &mut run,
                                len,
                                effect,
                            ))
                            .await
                        }
                        Action::Quit => {
                            // Redis would answer and close the shared connection.
                            self.enqueue_run(&mut run).await;
                            self.forward(upstream, buf, scanned).await;
                            self.enqueue(Entry::Local(Bytes::from_static(b"+OK\r\n")))
                                .await;
                            Next::Stop
                        }
                    };
                    match next {
                        Next::Read => continue,
                        Next::Stop => return Next::Stop,
                    }
                }
            }
            let uncertain = matches!(kind, Kind::EntersRaw | Kind::NoReply)
                || (self.governs()
                    && observed.is_none()
                    && matches!(kind, Kind::Delete | Kind::Flush { .. }));
            if uncertain && self.maybe_multi {
                // Whether Redis queues this command or runs it now depends on whether the
                // transaction is still open: find out before deciding.
                drop(parsed);
                match Box::pin(self.settle(upstream, buf, &mut scanned, &mut run)).await {
                    Settled::Stop => return Next::Stop,
                    // Still unknown: it goes to Redis on this connection, which is always
                    // correct for an invalidation; for the rest, relay raw from here on.
                    Settled::NotYet => {
                        if !matches!(kind, Kind::Delete | Kind::Flush { .. }) {
                            return Box::pin(self.enter_raw(upstream, buf, scanned, &mut run))
                                .await;
                        }
                        scanned += len;
                        run.count += 1;
                        continue;
                    }
                    Settled::Yes => {}
                }
                if self.maybe_multi {
                    // What EXEC answers for a queued command that replies more than once or
                    // not at all (Redis writes an EXEC array one element short for a queued
                    // `REPLCONF ACK`) cannot be counted: that EXEC relays raw.
                    self.multi_enters_raw |= matches!(kind, Kind::EntersRaw | Kind::NoReply);
                    // Queued by Redis: one `+QUEUED` reply, like any plain command.
                    scanned += len;
                    run.count += 1;
                    continue;
                }
                // The transaction is over; the command is judged outside it.
                continue;
            }
            let effect = match kind {
                Kind::Multi => {
                    self.maybe_multi = true;
                    Some(Effect::Multi)
                }
                Kind::Exec if self.multi_enters_raw => {
                    drop(parsed);
                    return Box::pin(self.enter_raw(upstream, buf, scanned, &mut run)).await;
                }
                Kind::Exec => Some(Effect::Exec),
                Kind::Discard => Some(Effect::Discard),
                Kind::Reset => Some(Effect::Reset {
                    auth_required: self.links.ctx.auth_required.load(Ordering::Relaxed),
                }),
                Kind::Identity => Some(effect_of(&cmd)),
                // The name on a connection of its own (a shared client's is recorded above),
                // for `flush.rules`.
                Kind::Plain => own_name(&cmd),
                _ => None,
            };
            // An inline line over 64 KiB that Redis accepted from the client (its reads ended
            // late enough) might be refused by the Redis behind, which reads this connection
            // in other pieces: such a command goes on as multibulk, which Redis runs the same.
            let long_inline = match parsed {
                Parsed::Inline { len, args } if len > LONG_INLINE => Some(args),
                _ => None,
            };
            scanned += len;
            if effect.is_some() {
                // Its reply must be inspected on its own: queue it as a separate entry.
                self.enqueue_run(&mut run).await;
                self.enqueue(Entry::Upstream {
                    count: 1,
                    blocking: false,
                    effect,
                    sent: Instant::now(),
                })
                .await;
                continue;
            }
            match kind {
                Kind::Blocking => {
                    run.count += 1;
                    run.blocking = true;
                }
                // Forwarded with the run, owing nothing.
                Kind::NoReply => {}
                Kind::Quit => {
                    // Redis answers QUIT and closes; nothing after it is read.
                    run.count += 1;
                    self.enqueue_run(&mut run).await;
                    self.forward(upstream, buf, scanned).await;
                    return Next::Stop;
                }
                Kind::EntersRaw => {
                    return Box::pin(self.enter_raw(upstream, buf, scanned - len, &mut run)).await;
                }
                _ => run.count += 1,
            }
            if let Some(args) = long_inline {
                let next = Box::pin(self.reencode(
                    upstream,
                    buf,
                    &mut scanned,
                    &mut run,
                    Long {
                        len,
                        args: &args,
                        kind,
                    },
                ))
                .await;
                if let Next::Stop = next {
                    return Next::Stop;
                }
            }
        }
        if !group.is_empty() {
            let flush = self.invalidate(upstream, buf, &mut scanned, &mut run, &mut group);
            if Box::pin(flush).await.is_stop() {
                return Next::Stop;
            }
        }
        self.enqueue_run(&mut run).await;
        self.forward(upstream, buf, scanned).await
    }

    /// Sends the inline command that ends at `buf[..*scanned]` (its `len` bytes, already
    /// counted in `run` unless it owes no reply) as a multibulk request of `args` instead, in its place.
    async fn reencode(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        long: Long<'_>,
    ) -> Next {
        let Long { len, args, kind } = long;
        // It goes in a write of its own, with its own reply (if it has one).
        let replies = u32::from(kind != Kind::NoReply);
        run.count -= replies;
        let blocking = run.blocking;
        self.enqueue_run(run).await;
        if let Next::Stop = self.forward(upstream, buf, *scanned - len).await {
            return Next::Stop;
        }
        if replies > 0 {
            self.enqueue(Entry::Upstream {
                count: 1,
                blocking,
                effect: None,
                sent: Instant::now(),
            })
            .await;
        }
        let mut out = Vec::with_capacity(len + 16 * args.len());
        crate::resp::encode_command(&mut out, args);
        buf.advance(len);
        *scanned = 0;
        self.send(upstream, &out).await
    }

    /// Runs the governed requests of `group`, at `buf[*scanned..]`, and empties it:
    /// everything before them goes out first and must have been answered before they run;
    /// everything after them waits until they have been applied (G3).
    async fn invalidate(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        group: &mut Group,
    ) -> Next {
        let Group { requests, lens, .. } = std::mem::take(group);
        // Each passes on the client's own connection, in its place (a cluster client's is
        // routed as any command of its own).
        let pass = |len: usize, scanned: &mut usize, run: &mut Run| {
            *scanned += len;
            run.count += 1;
        };
        let passthrough = |scanned: &mut usize, run: &mut Run| {
            lens.iter().for_each(|&len| pass(len, scanned, run));
            Next::Read
        };
        if let Upstream::Cluster(_) = upstream {
            return Box::pin(self.invalidate_cluster(upstream, buf, scanned, run, requests, lens))
                .await;
        }
        match Box::pin(self.settle(upstream, buf, scanned, run)).await {
            Settled::Yes => {}
            Settled::Stop => return Next::Stop,
            Settled::NotYet => {
                if let Err(reply) = self.scope(&requests, Some("earlier replies are unread")) {
                    return self.refuse(buf, &lens, reply).await;
                }
                // The client is not reading what it was already sent; waiting could deadlock
                // with it, so these go to Redis on the client's own connection, which
                // orders them exactly. Correct, just not coalesced.
                debug!("earlier replies still unread; invalidation goes to Redis directly");
                return passthrough(scanned, run);
            }
        }
        if !self.links.state().may_delegate() {
            let why = "client tracking is on, or the connection's identity is not known";
            if let Err(reply) = self.scope(&requests, Some(why)) {
                return self.refuse(buf, &lens, reply).await;
            }
            // Queued by Redis in the transaction, run as a client stormwall cannot
            // impersonate, or by a tracking client: Redis must see it on this connection.
            return passthrough(scanned, run);
        }
        if !self.links.state().auth_proven {
            // Whether Redis treats this connection as authenticated is not known yet (it may
            // have started to require a password after the shield's own connections, but
            // before this one, were opened): ask it on this connection first.
            if let Next::Stop = Box::pin(self.probe_auth(upstream)).await {
                return Next::Stop;
            }
        }
        let who = {
            let state = self.links.state();
            state.auth_proven.then(|| state.identity.clone())
        };
        let Some(who) = who else {
            // Redis would refuse the client: its own commands get Redis's own refusal.
            return passthrough(scanned, run);
        };
        let requests = match self.scope(&requests, None) {
            Ok(Some(pattern)) => requests
                .into_iter()
                .map(|request| match request {
                    Request::Flush { sync, .. } => Request::ScopedFlush {
                        pattern: pattern.clone(),
                        sync,
                    },
                    other => other,
                })
                .collect(),
            Ok(None) => requests,
            Err(reply) => return self.refuse(buf, &lens, reply).await,
        };
        let links = self.links;
        // A shared client has no connection of its own whose loss would end the session if
        // Redis restarts while the requests wait in the shield; the shared one tells.
        let lost = async {
            match upstream {
                Upstream::Shared(link) => link.lost(&links.ctx.pools, &links.config.upstream).await,
                Upstream::Socket(_) | Upstream::Cluster(_) => std::future::pending().await,
            }
        };
        let verdicts = tokio::select! {
            verdicts = links.ctx.engine.execute_all(&who, requests) => verdicts,
            // The client or Redis is gone; dropping the requests withdraws those not yet sent.
            _ = links.dead.cancelled() => return Next::Stop,
            _ = lost => {
                links.dead.cancel();
                return Next::Stop;
            }
        };
        self.read_at = Instant::now();
        for (verdict, len) in verdicts.into_iter().zip(lens) {
            match verdict {
                Verdict::Reply(reply) => {
                    // Requests of the group passed through before this one go first.
                    if *scanned > 0 {
                        self.enqueue_run(run).await;
                        if let Next::Stop = self.forward(upstream, buf, *scanned).await {
                            return Next::Stop;
                        }
                        *scanned = 0;
                    }
                    buf.advance(len);
                    self.enqueue(Entry::Local(reply)).await;
                }
                Verdict::PassThrough => pass(len, scanned, run),
                // Its fate is unknown: the client sees its connection close, as with Redis.
                Verdict::Unknown => return Next::Stop,
            }
        }
        Next::Read
    }

    /// [`invalidate`](Self::invalidate) for a cluster client: the same steps, with what
    /// passes through routed as the client's own commands are (`flush.rules` and the
    /// shield's connections of a client's own do not apply in front of a cluster).
    async fn invalidate_cluster(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        requests: Vec<Request>,
        lens: Vec<usize>,
    ) -> Next {
        let delegate = match Box::pin(self.settle(upstream, buf, scanned, run)).await {
            Settled::Stop => return Next::Stop,
            // The client is not reading what it was already sent: waiting could deadlock
            // with it. Correct, just not coalesced.
            Settled::NotYet => false,
            Settled::Yes => self.links.state().may_delegate(),
        };
        if delegate && !self.links.state().auth_proven {
            // Whether Redis treats this client as authenticated: asked of a master.
            if let Next::Stop = Box::pin(self.probe_auth(upstream)).await {
                return Next::Stop;
            }
        }
        let who = {
            let state = self.links.state();
            (delegate && state.auth_proven).then(|| state.identity.clone())
        };
        let links = self.links;
        let verdicts = match who {
            Some(who) => tokio::select! {
                verdicts = links.ctx.engine.execute_all(&who, requests) => verdicts,
                _ = links.dead.cancelled() => return Next::Stop,
            },
            None => Vec::new(),
        };
        self.read_at = Instant::now();
        let mut verdicts = verdicts.into_iter();
        for len in lens {
            let next = match verdicts.next() {
                Some(Verdict::Reply(reply)) => {
                    if let Next::Stop = self.forward(upstream, buf, *scanned).await {
                        return Next::Stop;
                    }
                    *scanned = 0;
                    buf.advance(len);
                    self.enqueue(Entry::Local(reply)).await;
                    Next::Read
                }
                Some(Verdict::Unknown) => return Next::Stop,
                // Passed through: routed as the client's own command.
                Some(Verdict::PassThrough) | None => {
                    Box::pin(self.cluster_own(upstream, buf, scanned, len)).await
                }
            };
            if let Next::Stop = next {
                return Next::Stop;
            }
        }
        Next::Read
    }

    /// Routes the cluster client's command at `buf[*scanned..][..len]` (already framed
    /// once) as any command of its own.
    async fn cluster_own(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        len: usize,
    ) -> Next {
        let Some(router) = self.links.ctx.cluster.clone() else {
            return Next::Stop;
        };
        let plan = {
            let mut parser = RequestParser::new(RequestLimits {
                max_bulk_len: u64::MAX,
                max_array_len: crate::resp::request::MAX_MULTIBULK,
                max_request_bytes: u64::MAX,
            });
            let bytes = &buf[*scanned..*scanned + len];
            match parser.parse(bytes) {
                Ok(Some(Parsed::Inline { args, .. })) => {
                    cluster::plan(&router, &Command::Inline { args: &args }, true)
                }
                Ok(Some(Parsed::Multibulk { .. })) => {
                    cluster::plan(&router, &parser.command(bytes), false)
                }
                _ => {
                    self.links.dead.cancel();
                    return Next::Stop;
                }
            }
        };
        self.cluster(upstream, buf, scanned, len, plan).await
    }

    /// What `flush.rules` make of a group of governed `requests` (all of one kind) for this
    /// client (the live rules: a reload applies to connected clients at once):
    /// `Some(pattern)` for `FLUSHDB`s a rule scopes, `None` for anything else. `Err` with the
    /// refusal when a rule matches (or may: the name or identity it depends on is not known)
    /// and the flush cannot run scoped (`unscopable` says why): the client's whole `FLUSHDB`
    /// never runs in its place.
    fn scope(
        &self,
        requests: &[Request],
        unscopable: Option<&str>,
    ) -> Result<Option<Bytes>, Bytes> {
        if !matches!(requests.first(), Some(Request::Flush { all: false, .. })) {
            return Ok(None);
        }
        let config = self.links.ctx.config.load();
        if config.flush.rules.is_empty() {
            return Ok(None);
        }
        let scope = {
            let state = self.links.state();
            let client = invalidation::Client {
                identity: &state.identity,
                identity_known: state.identity_known(),
                name: state.name.as_deref(),
                name_known: state.name_known(),
            };
            invalidation::scope_of(&config.flush.rules, client)
        };
        match (scope, unscopable) {
            (Scope::Whole, _) => Ok(None),
            (Scope::Pattern(pattern), None) => Ok(Some(pattern)),
            (Scope::Pattern(_), Some(why)) => Err(Engine::unscoped(why)),
            (Scope::Unknown, why) => Err(Engine::unscoped(why.unwrap_or(
                "a rule depends on the connection's name or identity, changed by a transaction",
            ))),
        }
    }

    /// Answers each governed request of a group (their `lens`, from the start of `buf`:
    /// everything before them was settled) with `reply` in its place.
    async fn refuse(&mut self, buf: &mut BytesMut, lens: &[usize], reply: Bytes) -> Next {
        for &len in lens {
            buf.advance(len);
            self.enqueue(Entry::Local(reply.clone())).await;
        }
        Next::Read
    }

    /// Sends a `PING` on the client's connection (its reply is not forwarded) and waits for
    /// it, so the confirmed state says whether Redis treats the connection as authenticated.
    /// Done once per connection, before its first invalidation the shield would run.
    async fn probe_auth(&mut self, upstream: &mut Upstream) -> Next {
        if let Upstream::Cluster(link) = upstream {
            let Some(rx) = self.cluster_capture(link, b"*1\r\n$4\r\nPING\r\n", 1).await else {
                return Next::Stop;
            };
            let reply = tokio::select! {
                got = rx => got.ok().and_then(|mut r| r.pop()),
                _ = self.links.dead.cancelled() => return Next::Stop,
            };
            let Some(reply) = reply else {
                self.links.dead.cancel();
                return Next::Stop;
            };
            self.links.confirm(Effect::AuthProbe, &reply);
            return Next::Read;
        }
        self.enqueue(Entry::Probe).await;
        if let Next::Stop = self.send(upstream, b"*1\r\n$4\r\nPING\r\n").await {
            return Next::Stop;
        }
        tokio::select! {
            _ = self.links.queue.drained() => Next::Read,
            _ = self.links.dead.cancelled() => Next::Stop,
        }
    }

    /// Observe mode (`invalidation.mode = "observe"`, read live so that a reload applies to
    /// connected clients at once): what `kind` is to the shadow model, if it is governed.
    /// Such a command passes through exactly as with `invalidation.enabled = false`.
    fn observed(&self, kind: Kind) -> Option<Observed> {
        let observed = match kind {
            Kind::Delete => Observed::Delete { unlink: false },
            Kind::Flush { all, .. } => Observed::Flush { all },
            _ => return None,
        };
        (self.links.config.invalidation.enabled && self.links.ctx.engine.observing())
            .then_some(observed)
    }

    /// Tells the shadow model about a governed command that passes through in observe
    /// mode, without waiting for anything: with the client's identity if enforcement would
    /// have governed it, without if it would have passed it through too (inside a
    /// transaction or one that may still be open, a tracking client, an identity it cannot
    /// reproduce, a client not yet authenticated).
    fn observe(&self, command: Observed, cmd: &Command<'_>, follows: bool) {
        let links = self.links;
        let (command, keys) = match command {
            Observed::Delete { .. } => (
                Observed::Delete {
                    unlink: cmd
                        .arg(0)
                        .is_some_and(|n| n.eq_ignore_ascii_case(b"UNLINK")),
                },
                cmd.argc(),
            ),
            flush => (flush, 1),
        };
        let who = {
            let state = links.state();
            // A `MULTI` not yet answered: once every reply is in, the state says.
            let transaction = state.in_multi || (self.maybe_multi && !links.queue.is_drained());
            let governed = !transaction && state.may_delegate() && !links.unauthenticated();
            governed.then(|| state.identity.clone())
        };
        let keys = (1..keys).filter_map(|i| cmd.arg(i));
        links
            .ctx
            .engine
            .observe(who.as_ref(), command, keys, follows);
    }

    /// How a flush the policy denies is refused, if `kind` is one. Never in observe mode,
    /// which counts it instead (`would="deny"`).
    fn denial(&self, kind: Kind) -> Option<Denial> {
        let Kind::Flush { all, .. } = kind else {
            return None;
        };
        if self.observed(kind).is_some() {
            return None;
        }
        let cmd = if all {
            FlushCommand::FlushAll
        } else {
            FlushCommand::FlushDb
        };
        // The live policy, not this session's snapshot: a reload that denies a flush applies
        // to connected clients at once.
        self.links
            .ctx
            .config
            .load()
            .flush
            .deny
            .contains(&cmd)
            .then_some(Denial { all })
    }

    /// Refuses a denied flush at `buf[*scanned..][..len]` in its place in the stream: Redis
    /// gets a command it refuses instead (so a transaction around it aborts, exactly as for
    /// any command Redis refuses when queueing), and the client gets stormwall's error in
    /// place of Redis's.
    async fn substitute(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        len: usize,
        denial: Denial,
    ) -> Next {
        let reply = Engine::denied(denial.all);
        if let Upstream::Cluster(_) = upstream {
            // Nothing to substitute on a connection of the client's own: answered here.
            return self.answer(upstream, buf, scanned, run, len, reply).await;
        }
        if !self.raw {
            self.enqueue_run(run).await;
        }
        if let Next::Stop = self.forward(upstream, buf, *scanned).await {
            return Next::Stop;
        }
        *scanned = 0;
        // Queued after the write before it: each write carries exactly the replies queued
        // for it.
        if !self.raw {
            self.enqueue(Entry::Replace(reply)).await;
        }
        if let Next::Stop = self.send(upstream, denial.substitute()).await {
            return Next::Stop;
        }
        buf.advance(len);
        Next::Read
    }

    /// Forwards the `scanned` bytes framed so far, then relays raw from the command after
    /// them (the one that enters raw mode) on.
    async fn enter_raw(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: usize,
        run: &mut Run,
    ) -> Next {
        self.enqueue_run(run).await;
        self.enqueue(Entry::Raw).await;
        self.raw = true;
        debug!("relaying raw from here on");
        if let Next::Stop = self.forward(upstream, buf, scanned).await {
            return Next::Stop;
        }
        self.process_raw(upstream, buf).await
    }

    /// Raw mode: bytes go to Redis as they came, except that denied flushes are still
    /// replaced (the client then sees Redis's refusal of the substitute, or nothing under
    /// `CLIENT REPLY OFF`).
    pub(super) async fn process_raw(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
    ) -> Next {
        let mut scanned = 0;
        let mut run = Run::default();
        while !self.unframed {
            let parsed = match self.parser.parse(&buf[scanned..]) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => {
                    // Redis frames the same bytes the same way and answers the error itself.
                    self.unframed = true;
                    break;
                }
            };
            let kind = match &parsed {
                Parsed::Empty { .. } => Kind::Plain,
                Parsed::Multibulk { .. } => policy::classify(&self.parser.command(&buf[scanned..])),
                Parsed::Inline { args, .. } => policy::classify(&Command::Inline { args }),
            };
            let len = parsed.len();
            drop(parsed);
            if let Some(command) = self.observed(kind) {
                // Relayed raw, ungoverned under enforcement too (unless denied).
                self.links
                    .ctx
                    .engine
                    .observe(None, command, std::iter::empty(), false);
            }
            match self.denial(kind) {
                Some(denial) => {
                    let next = Box::pin(self.substitute(
                        upstream,
                        buf,
                        &mut scanned,
                        &mut run,
                        len,
                        denial,
                    ))
                    .await;
                    if let Next::Stop = next {
                        return Next::Stop;
                    }
                }
                None => scanned += len,
            }
        }
        let len = if self.unframed { buf.len() } else { scanned };
        self.forward(upstream, buf, len).await
    }

    /// Sends everything framed so far and waits until Redis has answered all of it, so the
    /// connection's confirmed state is current for the next command.
    async fn settle(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
    ) -> Settled {
        self.enqueue_run(run).await;
        if let Next::Stop = self.forward(upstream, buf, *scanned).await {
            return Settled::Stop;
        }
        *scanned = 0;
        let links = self.links;
        tokio::select! {
            _ = links.queue.drained() => {}
            _ = links.dead.cancelled() => return Settled::Stop,
            _ = links.client_blocked() => {
                if !links.queue.is_drained() {
                    return Settled::NotYet;
                }
            }
        }
        let in_multi = links.state().in_multi;
        self.maybe_multi = in_multi;
        if !in_multi {
            self.multi_enters_raw = false;
        }
        Settled::Yes
    }

    /// Whether invalidations on this connection go through the engine.
    fn governs(&self) -> bool {
        self.links.config.invalidation.enabled
    }

    /// Forwards the commands framed before the bad input, then answers with the protocol
    /// error and stops reading; the reply side closes the connection after delivering it.
    async fn protocol_error(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: usize,
        mut run: Run,
        error: ProtocolError,
    ) -> Next {
        debug!(%error, "client protocol error; closing after pending replies");
        self.links.ctx.metrics.protocol_errors.increment(1);
        self.parser.reset();
        self.enqueue_run(&mut run).await;
        // Sent before the error is queued: a cluster client's commands are queued as they
        // are sent.
        self.forward(upstream, buf, scanned).await;
        self.enqueue(Entry::Local(error.to_reply())).await;
        Next::Stop
    }

    async fn enqueue_run(&self, run: &mut Run) {
        if run.count > 0 {
            self.links
                .ctx
                .metrics
                .passthrough
                .increment(u64::from(run.count));
            let entry = Entry::Upstream {
                count: run.count,
                blocking: run.blocking,
                effect: None,
                sent: Instant::now(),
            };
            self.enqueue(entry).await;
            *run = Run::default();
        }
    }

    pub(super) async fn enqueue(&self, entry: Entry) {
        let replies = match &entry {
            Entry::Upstream { count, .. } => *count,
            Entry::Replace(_) | Entry::Probe => 1,
            Entry::Local(_) | Entry::Raw | Entry::Switch(_) | Entry::Cluster(_) => 0,
        };
        self.unsent.fetch_add(replies, Ordering::Relaxed);
        // False only when the reply side is gone, and the session is ending anyway.
        let _ = self.links.queue.push(entry).await;
    }

    /// Writes `buf[..len]` to Redis and consumes it.
    pub(super) async fn forward(
        &self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        len: usize,
    ) -> Next {
        if len == 0 {
            return Next::Read;
        }
        let next = self.send(upstream, &buf[..len]).await;
        buf.advance(len);
        self.links
            .ctx
            .metrics
            .overhead
            .record(self.read_at.elapsed().as_secs_f64());
        next
    }

    /// Writes bytes to Redis: the client's, or ones stormwall made (a substitute, a
    /// re-encoding, a probe), carrying the replies queued since the last write. A failed
    /// write ends the session.
    async fn send(&self, upstream: &mut Upstream, bytes: &[u8]) -> Next {
        let replies = self.unsent.swap(0, Ordering::Relaxed);
        let links = self.links;
        let ok = match upstream {
            Upstream::Socket(write) => match write.send_all(bytes).await {
                Ok(()) => true,
                Err(e) => {
                    debug!(error = %e, "upstream write failed");
                    false
                }
            },
            Upstream::Cluster(link) => return self.cluster_flush(link, bytes).await,
            Upstream::Shared(link) if link.try_send(&links.config.upstream, bytes, replies) => true,
            Upstream::Shared(link) => {
                let cfg = &links.config.upstream;
                let send = link.send(&links.ctx.pools, cfg, bytes, replies);
                tokio::select! {
                    sent = send => sent,
                    _ = links.dead.cancelled() => return Next::Stop,
                }
            }
        };
        if ok {
            Next::Read
        } else {
            links.dead.cancel();
            Next::Stop
        }
    }

    /// Forwards what was framed before the command at `buf[*scanned..]` and waits until
    /// Redis has answered it all (received, not necessarily delivered to the client):
    /// commands sent on another connection after this run after everything before.
    pub(super) async fn drain_shared(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
    ) -> Next {
        self.enqueue_run(run).await;
        if let Next::Stop = self.forward(upstream, buf, *scanned).await {
            return Next::Stop;
        }
        *scanned = 0;
        if let Upstream::Cluster(_) = upstream {
            // Its replies are resolved, in order, by the reply side.
            tokio::select! {
                _ = self.links.queue.drained() => return Next::Read,
                _ = self.links.dead.cancelled() => return Next::Stop,
            }
        }
        let Upstream::Shared(link) = upstream else {
            return Next::Read;
        };
        tokio::select! {
            _ = link.inbox.settled() => {}
            _ = self.links.dead.cancelled() => return Next::Stop,
        }
        if link.inbox.failed() {
            return Next::Stop;
        }
        Next::Read
    }

    /// Moves a shared client to a private connection for the rest of its life, before the
    /// command at `buf[*scanned..]`: a spare, put into the client's state (user, database,
    /// protocol, name), once everything before has been answered.
    async fn pin(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        reason: PinReason,
        barrier: bool,
    ) -> Next {
        if let Next::Stop = self.drain_shared(upstream, buf, scanned, run).await {
            return Next::Stop;
        }
        let links = self.links;
        let cfg = &links.config.upstream;
        let mut replay = links.state().replay();
        if barrier {
            replay.push(sharing::write_barrier());
        }
        let conn = match links.ctx.pools.prepared(cfg, &replay).await {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = ?e, reason = reason.label(), "cannot open a private connection for a pinned client; closing it");
                links.dead.cancel();
                return Next::Stop;
            }
        };
        self.move_to(upstream, conn, reason).await
    }

    /// Sends `request` (one client command) on a spare put into a state by `setup`, and
    /// returns the spare with Redis's reply; `None` (the session is ending) if that fails.
    async fn on_spare(&self, setup: &[Vec<Bytes>], request: &[u8]) -> Option<(Conn, Bytes)> {
        let links = self.links;
        let cfg = &links.config.upstream;
        let exchange = async {
            let mut conn = links
                .ctx
                .pools
                .prepared(cfg, setup)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let deadline = Instant::now() + cfg.reply_wait();
            let mut replies = conn
                .exchange_until(request, 1, deadline)
                .await
                .map_err(|e| e.to_string())?;
            let reply = replies.pop().ok_or("no reply")?;
            Ok::<_, String>((conn, reply))
        };
        match exchange.await {
            Ok(done) => Some(done),
            Err(e) => {
                debug!(error = %e, "cannot ask Redis on a spare connection; closing the client");
                links.dead.cancel();
                None
            }
        }
    }

    /// A command at `buf[..len]` after what is framed that Redis decides whether to accept
    /// ([`Action::PinIfAccepted`]): sent on a spare put into the client's state; refused, the
    /// client gets the refusal and stays shared; accepted, that spare becomes its own.
    async fn pin_if_accepted(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        len: usize,
        reason: PinReason,
    ) -> Next {
        if let Next::Stop = self.drain_shared(upstream, buf, scanned, run).await {
            return Next::Stop;
        }
        let links = self.links;
        let setup = links.state().replay();
        let Some((conn, reply)) = self.on_spare(&setup, &buf[..len]).await else {
            return Next::Stop;
        };
        buf.advance(len);
        let accepted = reply.first() != Some(&b'-');
        if accepted && let Upstream::Cluster(_) = upstream {
            // A connection of its own to one master cannot carry a cluster client's
            // commands for every slot: the spare (in the state Redis accepted) is dropped.
            let reply = crate::resp::error_reply(
                "ERR stormwall: this connection feature is not supported with a Redis Cluster upstream",
            );
            self.enqueue(Entry::Local(reply)).await;
            return Next::Read;
        }
        self.enqueue(Entry::Local(reply)).await;
        if !accepted {
            return Next::Read;
        }
        self.move_to(upstream, conn, reason).await
    }

    /// The client's replies come from its own connection from here on (after everything
    /// queued so far), and its commands go there.
    async fn move_to(&mut self, upstream: &mut Upstream, conn: Conn, reason: PinReason) -> Next {
        let links = self.links;
        let epoch = conn.epoch();
        let Some((read, write)) = conn.into_halves() else {
            debug!("unexpected bytes from Redis on a new private connection; closing the client");
            links.dead.cancel();
            return Next::Stop;
        };
        // Closed if the upstream moves (see `Links::private_epoch`), or moved already while
        // this connection was being opened.
        links.private_epoch.store(epoch, Ordering::Release);
        if !links.config.upstream.target.is_current(epoch) {
            links.dead.cancel();
            return Next::Stop;
        }
        debug!(
            reason = reason.label(),
            "client moves to a private connection"
        );
        links.ctx.metrics.pins[reason as usize].increment(1);
        links.ctx.metrics.private_connections.increment(1.0);
        links.pinned.store(true, Ordering::Relaxed);
        self.enqueue(Entry::Switch(Private(read))).await;
        *upstream = Upstream::Socket(write);
        Next::Read
    }

    /// A shared client's `AUTH` or `HELLO` at `buf[..len]` after what is framed: decided by
    /// Redis on a spare put into the client's current state, so the shared connections are
    /// never touched; an accepted login moves the client to its new identity's connections.
    async fn login(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        len: usize,
        effect: Option<Effect>,
    ) -> Next {
        if let Next::Stop = self.drain_shared(upstream, buf, scanned, run).await {
            return Next::Stop;
        }
        let links = self.links;
        let cfg = &links.config.upstream;
        let (replay, before) = {
            let state = links.state();
            (state.replay(), state.clone())
        };
        // The spare in a new connection's state as Redis judges it now. A login that
        // carries credentials is judged on those alone: the client's current ones (which
        // may have been rotated since it authenticated, and Redis does not hold that against
        // its connection) and what needs them (its database, its protocol) come after, if it
        // succeeds. `HELLO` without `AUTH` is judged as the client is: user, database and
        // protocol first. Never its name: the spare may become a shared connection.
        let authenticates = matches!(
            effect,
            Some(Effect::Login {
                login: Login::Known { .. } | Login::Untracked,
                ..
            })
        );
        let setup: Vec<_> = replay
            .into_iter()
            .filter(|c| !authenticates && c[0].as_ref() != b"CLIENT")
            .collect();
        let Some((conn, reply)) = self.on_spare(&setup, &buf[..len]).await else {
            return Next::Stop;
        };
        buf.advance(len);
        if let Some(effect) = effect {
            links.confirm(effect, &reply);
        }
        self.rekey(upstream, &before);
        if reply.first() != Some(&b'-')
            && let Upstream::Shared(link) = upstream
        {
            let mut conn = conn;
            // The client's database and protocol, which a login with credentials left out.
            let rest: Vec<_> = links
                .state()
                .replay()
                .into_iter()
                .filter(|c| authenticates && matches!(c[0].as_ref(), b"SELECT" | b"HELLO"))
                .collect();
            let deadline = Instant::now() + cfg.reply_wait();
            if conn.establish(&rest, deadline).await.is_ok() {
                // The spare is now exactly in the client's new state.
                link.adopt(conn, cfg);
            }
        }
        self.enqueue(Entry::Local(reply)).await;
        Next::Read
    }

    /// A shared client's `SELECT` or `CLIENT SETNAME`/`SETINFO` at `buf[..len]` after what is
    /// framed: sent in order on its shared connection, its reply read here to update the
    /// state this session holds (and, for `SELECT`, the connection put straight back in its
    /// database by a second `SELECT` in the same write, so no other client's command runs
    /// in between).
    async fn checked(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        len: usize,
        effect: Option<Effect>,
    ) -> Next {
        self.enqueue_run(run).await;
        if let Next::Stop = self.forward(upstream, buf, *scanned).await {
            return Next::Stop;
        }
        *scanned = 0;
        let links = self.links;
        let before = links.state().clone();
        let mut out = buf[..len].to_vec();
        let mut replies = 1;
        match effect {
            Some(Effect::Select(_)) => {
                let db = Bytes::from(before.identity.db.to_string());
                crate::resp::encode_command(&mut out, &[Bytes::from_static(b"SELECT"), db]);
                replies = 2;
            }
            Some(Effect::ClientInfo(InfoField::Name, _)) => {
                // The shared connection keeps no client's name (CLIENT LIST would show it).
                out.extend_from_slice(b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$0\r\n\r\n");
                replies = 2;
            }
            _ => {}
        }
        buf.advance(len);
        let got = self.capture(upstream, &out, replies).await;
        let Some(mut got) = got.filter(|r| r.len() == replies as usize) else {
            links.dead.cancel();
            return Next::Stop;
        };
        let reply = got.swap_remove(0);
        // The shared connection must be back in its own database, whatever the client's
        // `SELECT` did: read, not assumed (`SELECT` back can only fail if Redis changed).
        let select = matches!(effect, Some(Effect::Select(_)));
        if select && got[0].as_ref() != b"+OK\r\n" {
            warn!("a shared connection could not be put back in its database; closing it");
            if let Upstream::Shared(link) = upstream {
                link.close_connection();
            }
            links.dead.cancel();
            return Next::Stop;
        }
        if let Some(effect) = effect {
            links.confirm(effect, &reply);
        }
        self.rekey(upstream, &before);
        self.enqueue(Entry::Local(reply)).await;
        Next::Read
    }

    /// A shared client's `CLIENT GETNAME` at `buf[..len]` after what is framed: Redis judges
    /// it on the shared connection (an ACL may refuse it: the client gets that refusal), and
    /// the client gets the name it holds instead of the shared connection's (none).
    async fn get_name(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        len: usize,
    ) -> Next {
        self.enqueue_run(run).await;
        if let Next::Stop = self.forward(upstream, buf, *scanned).await {
            return Next::Stop;
        }
        *scanned = 0;
        let out = buf[..len].to_vec();
        buf.advance(len);
        let links = self.links;
        let got = self.capture(upstream, &out, 1).await;
        let Some(reply) = got.and_then(|mut r| r.pop()) else {
            links.dead.cancel();
            return Next::Stop;
        };
        let reply = if reply.first() == Some(&b'-') {
            reply
        } else {
            let state = links.state();
            match &state.name {
                Some(name) => {
                    let mut out = format!("${}\r\n", name.len()).into_bytes();
                    out.extend_from_slice(name);
                    out.extend_from_slice(b"\r\n");
                    Bytes::from(out)
                }
                None if state.resp3 => Bytes::from_static(b"_\r\n"),
                None => Bytes::from_static(b"$-1\r\n"),
            }
        };
        self.enqueue(Entry::Local(reply)).await;
        Next::Read
    }

    /// Answers the command at `buf[*scanned..][..len]` with `reply`, after what is framed.
    async fn answer(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        len: usize,
        reply: Bytes,
    ) -> Next {
        self.enqueue_run(run).await;
        if let Next::Stop = self.forward(upstream, buf, *scanned).await {
            return Next::Stop;
        }
        *scanned = 0;
        buf.advance(len);
        self.enqueue(Entry::Local(reply)).await;
        Next::Read
    }

    /// Sends `out` (`replies` commands) in this client's state on a shared connection
    /// (a cluster client's: any master's) and returns the replies to stormwall; `None` (the
    /// session is ending) if they cannot be had.
    async fn capture(
        &mut self,
        upstream: &mut Upstream,
        out: &[u8],
        replies: u32,
    ) -> Option<Vec<Bytes>> {
        let links = self.links;
        let cfg = &links.config.upstream;
        match upstream {
            Upstream::Shared(link) => tokio::select! {
                got = link.capture(&links.ctx.pools, cfg, out, replies) => got,
                _ = links.dead.cancelled() => None,
            },
            Upstream::Cluster(link) => {
                let rx = self.cluster_capture(link, out, replies).await?;
                tokio::select! {
                    got = rx => got.ok(),
                    _ = links.dead.cancelled() => None,
                }
            }
            Upstream::Socket(_) => None,
        }
    }

    /// After a held state change: the shared connections for the client's new state.
    fn rekey(&self, upstream: &mut Upstream, before: &super::state::Confirmed) {
        let links = self.links;
        if let Upstream::Cluster(link) = upstream {
            let state = links.state();
            link.rekey(Key {
                identity: state.identity.clone(),
                proto: if state.resp3 { 3 } else { 2 },
                authenticated: state.authenticated,
            });
            return;
        }
        let Upstream::Shared(link) = upstream else {
            return;
        };
        let state = links.state();
        if state.identity == before.identity && state.resp3 == before.resp3 {
            return;
        }
        let key = Key {
            identity: state.identity.clone(),
            proto: if state.resp3 { 3 } else { 2 },
            authenticated: state.authenticated,
        };
        drop(state);
        let size = links
            .config
            .upstream
            .shared_connections(links.config.runtime.worker_threads);
        link.rekey(links.ctx.pools.group(&key, size));
    }
}

/// Whether two governed commands pipelined back to back would have gone to the shield
/// together (one group, one worker): deletes, or flushes of the same target.
fn same_batch(a: Observed, b: Observed) -> bool {
    match (a, b) {
        (Observed::Delete { .. }, Observed::Delete { .. }) => true,
        (Observed::Flush { all: x }, Observed::Flush { all: y }) => x == y,
        _ => false,
    }
}

/// A long inline command being re-encoded: its length, arguments and class.
struct Long<'a> {
    len: usize,
    args: &'a [Vec<u8>],
    kind: Kind,
}

/// A flush the policy (`flush.deny`) refuses.
struct Denial {
    all: bool,
}

impl Denial {
    /// What Redis gets instead: a command it does not know, which it refuses (and which
    /// aborts a surrounding transaction). Its name is the explanation a client sees where
    /// stormwall cannot put its own reply in place (raw mode).
    fn substitute(&self) -> &'static [u8] {
        if self.all {
            b"*1\r\n$38\r\nFLUSHALL-denied-by-stormwall-flush.deny\r\n"
        } else {
            b"*1\r\n$37\r\nFLUSHDB-denied-by-stormwall-flush.deny\r\n"
        }
    }
}

/// The state change an `AUTH`/`HELLO`/`SELECT`/`CLIENT TRACKING` asks for, read the way
/// Redis reads it.
fn effect_of(cmd: &Command<'_>) -> Effect {
    let name = cmd.arg(0).unwrap_or_default();
    if name.eq_ignore_ascii_case(b"CLIENT") {
        return Effect::Tracking(cmd.arg(2).is_some_and(|a| a.eq_ignore_ascii_case(b"ON")));
    }
    if name.eq_ignore_ascii_case(b"SELECT") {
        let db = cmd.arg(1).filter(|_| cmd.argc() == 2).and_then(parse_int);
        return Effect::Select(db);
    }
    if name.eq_ignore_ascii_case(b"AUTH") {
        // AUTH password | AUTH username password; other forms are errors Redis replies to.
        let (user, password) = match cmd.argc() {
            2 => (None, cmd.arg(1)),
            3 => (cmd.arg(1), cmd.arg(2)),
            _ => (None, None),
        };
        return Effect::Login {
            hello: false,
            login: login(user, password),
            proto: None,
            name: None,
        };
    }
    // HELLO [protover [AUTH username password] [SETNAME clientname]], parsed as Redis's
    // helloCommand does: options in order, each consuming its values, the last AUTH wins.
    let mut credentials = None;
    let mut name = None;
    let proto = cmd
        .arg(1)
        .and_then(parse_int)
        .filter(|p| matches!(p, 2 | 3))
        .map(|p| p as u8);
    let mut i = 2;
    while let Some(opt) = cmd.arg(i) {
        let more = cmd.argc() - 1 - i;
        if opt.eq_ignore_ascii_case(b"AUTH") && more >= 2 {
            credentials = Some((cmd.arg(i + 1), cmd.arg(i + 2)));
            i += 3;
        } else if opt.eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
            name = cmd.arg(i + 1).map(Bytes::copy_from_slice);
            i += 2;
        } else {
            // A syntax error Redis refuses: the reply decides, and it will not be accepted.
            break;
        }
    }
    Effect::Login {
        hello: true,
        login: match credentials {
            None => Login::Unchanged,
            Some((user, password)) => login(user, password),
        },
        proto,
        name,
    }
}

/// What a `CLIENT SETNAME name` or `CLIENT SETINFO LIB-NAME|LIB-VER value` sets; `None` for
/// other forms (Redis refuses them, and nothing changes).
fn client_info(cmd: &Command<'_>) -> Option<Effect> {
    let sub = cmd.arg(1)?;
    let (field, value) = if sub.eq_ignore_ascii_case(b"SETNAME") && cmd.argc() == 3 {
        (InfoField::Name, cmd.arg(2)?)
    } else if sub.eq_ignore_ascii_case(b"SETINFO") && cmd.argc() == 4 {
        let attr = cmd.arg(2)?;
        let field = if attr.eq_ignore_ascii_case(b"LIB-NAME") {
            InfoField::LibName
        } else if attr.eq_ignore_ascii_case(b"LIB-VER") {
            InfoField::LibVer
        } else {
            return None;
        };
        (field, cmd.arg(3)?)
    } else {
        return None;
    };
    (value.len() <= MAX_KEPT_PASSWORD)
        .then(|| Effect::ClientInfo(field, Bytes::copy_from_slice(value)))
}

/// The effect of a `CLIENT SETNAME`/`SETINFO` among plain commands, if `cmd` is one.
fn own_name(cmd: &Command<'_>) -> Option<Effect> {
    cmd.arg(0)
        .is_some_and(|n| n.eq_ignore_ascii_case(b"CLIENT"))
        .then(|| client_info(cmd))
        .flatten()
}

fn login(user: Option<&[u8]>, password: Option<&[u8]>) -> Login {
    match password {
        Some(p) if p.len() + user.map_or(0, <[u8]>::len) <= MAX_KEPT_PASSWORD => Login::Known {
            user: user.map(Bytes::copy_from_slice),
            password: Bytes::copy_from_slice(p),
        },
        _ => Login::Untracked,
    }
}

/// Reads into `buf`; `None` if nothing arrived within `idle` (zero: wait forever).
async fn read_within(
    client: &mut ReadHalf,
    buf: &mut BytesMut,
    idle: std::time::Duration,
) -> Option<std::io::Result<usize>> {
    // Nothing held: an idle client keeps no buffer while it waits.
    crate::buffers::give(buf);
    // Readiness alone does not count against the task's cooperative budget (a read
    // did): without this, a client that never stops sending would keep the thread
    // from the shared connection that carries its commands and replies.
    tokio::task::consume_budget().await;
    let read = client.read_some(buf, |buf| {
        if buf.capacity() == 0 {
            *buf = crate::buffers::take();
        }
        if buf.capacity() - buf.len() < MIN_READ {
            buf.reserve(READ_BUF);
        }
    });
    if idle.is_zero() {
        Some(read.await)
    } else {
        tokio::time::timeout(idle, read).await.ok()
    }
}
