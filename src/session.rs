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
//! They are linked by an in-order queue of [`Entry`]s: "the next N replies come from Redis",
//! "send this reply stormwall made itself", or "from here on relay raw bytes". The request
//! side always enqueues an entry *before* writing the bytes it describes, so when a reply
//! arrives its entry is already queued; a reply with no entry means the two sides disagree
//! and the connection is failed rather than risk handing a client someone else's answer.
//!
//! Failure handling: if Redis goes away or stops answering, every command still awaiting a
//! reply gets an explicit `-ERR` saying it may or may not have been applied, and the client
//! connection is closed — as it would be by Redis itself — so the client's library reconnects
//! and re-establishes its own state (`SELECT`, `AUTH`, subscriptions) instead of silently
//! continuing on a fresh upstream connection that has none of it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::invalidation::{Engine, Request};
use crate::net::{ReadHalf, Stream, WriteHalf};
use crate::policy::{self, Kind};
use crate::resp::reply::{FrameKind, ReplyScanner};
use crate::resp::request::{Command, Parsed, RequestLimits, RequestParser};
use crate::resp::{ProtocolError, error_reply};
use crate::upstream::Identity;

/// Initial read buffer size per direction; buffers grow only for large frames.
const READ_BUF: usize = 16 * 1024;
/// Reads are attempted with at least this much free space.
const MIN_READ: usize = 4 * 1024;
/// Queued entries per connection before the request side waits (each entry may stand for
/// many pipelined commands, so this bounds memory, not pipeline depth).
const QUEUE: usize = 256;

const LOST: &str = "ERR stormwall: connection to upstream Redis lost before the reply; \
                    the command may or may not have been applied";
const TIMED_OUT: &str = "ERR stormwall: upstream Redis did not reply within \
                         upstream.reply_timeout; the command may or may not have been applied";
const DESYNC: &str = "ERR stormwall: unexpected reply from upstream Redis; the command may or \
                      may not have been applied";

/// What every session shares: configuration and process-wide state.
pub struct Context {
    pub config: Arc<Config>,
    /// Cancelled when the process starts draining.
    pub shutdown: CancellationToken,
    /// Whether the last upstream connection attempt succeeded; flips are logged once each,
    /// so a Redis outage produces two log lines, not one per client.
    pub upstream_up: AtomicBool,
    /// The invalidation shield every session hands governed commands to.
    pub engine: Engine,
}

impl Context {
    fn note_upstream(&self, up: bool, error: Option<&std::io::Error>) {
        if self.upstream_up.swap(up, Ordering::Relaxed) != up {
            let addr = &self.config.upstream.address;
            match error {
                None => info!(upstream = %addr, "upstream Redis reachable"),
                Some(e) => {
                    warn!(upstream = %addr, error = %e, "upstream Redis unreachable; clients get errors until it returns")
                }
            }
        }
    }
}

/// One queued instruction for the reply side, in request order.
#[derive(Debug)]
enum Entry {
    /// The next `count` replies from Redis answer forwarded commands. `effect` (only with
    /// `count == 1`) changes the session's identity if Redis accepts the command.
    Upstream {
        count: u32,
        blocking: bool,
        effect: Option<Effect>,
    },
    /// A reply stormwall produced itself.
    Local(Bytes),
    /// From here on, Redis's bytes are relayed as they come (pub/sub, `MONITOR`, …).
    Raw,
}

/// A change to the session's [`Identity`], applied once Redis has accepted the command.
#[derive(Debug)]
enum Effect {
    Select(i64),
    Auth {
        user: Option<Bytes>,
        password: Bytes,
    },
    Reset,
}

impl Effect {
    /// The effect of an `AUTH`/`HELLO … AUTH`/`SELECT` command, if it has a recognisable one.
    fn of(cmd: &Command<'_>) -> Option<Effect> {
        let name = cmd.arg(0)?;
        let owned = |i: usize| cmd.arg(i).map(Bytes::copy_from_slice);
        if name.eq_ignore_ascii_case(b"SELECT") && cmd.argc() == 2 {
            let db = std::str::from_utf8(cmd.arg(1)?).ok()?.parse().ok()?;
            return Some(Effect::Select(db));
        }
        if name.eq_ignore_ascii_case(b"AUTH") {
            return match cmd.argc() {
                2 => Some(Effect::Auth {
                    user: None,
                    password: owned(1)?,
                }),
                3 => Some(Effect::Auth {
                    user: owned(1),
                    password: owned(2)?,
                }),
                _ => None,
            };
        }
        // HELLO [protover [AUTH username password] [SETNAME clientname]]
        let at = (2..cmd.argc())
            .find(|&i| cmd.arg(i).is_some_and(|a| a.eq_ignore_ascii_case(b"AUTH")))?;
        Some(Effect::Auth {
            user: owned(at + 1),
            password: owned(at + 2)?,
        })
    }

    fn apply(self, who: &mut Identity) {
        match self {
            Effect::Select(db) => who.db = db,
            Effect::Auth { user, password } => {
                who.user = user;
                who.password = Some(password);
            }
            Effect::Reset => *who = Identity::default(),
        }
    }
}

/// Serves one client until it disconnects, Redis goes away, or the process drains.
pub async fn serve(client: Stream, ctx: Arc<Context>) {
    let cfg = &ctx.config;
    let upstream = match Stream::connect(
        &cfg.upstream.address,
        cfg.upstream.connect_timeout,
        cfg.upstream.tcp_keepalive,
    )
    .await
    {
        Ok(s) => {
            ctx.note_upstream(true, None);
            s
        }
        Err(e) => {
            ctx.note_upstream(false, Some(&e));
            refuse(client, &cfg.upstream.address.to_string(), &e).await;
            return;
        }
    };
    let (client_read, client_write) = client.into_split();
    let (upstream_read, mut upstream_write) = upstream.into_split();
    let (tx, rx) = mpsc::channel(QUEUE);
    let links = Links {
        ctx: &ctx,
        dead: CancellationToken::new(),
        inflight: AtomicUsize::new(0),
        drained: Notify::new(),
        identity: Mutex::new(Identity::default()),
    };
    let limits = &cfg.limits;
    let requests = RequestSide {
        links: &links,
        tx,
        parser: RequestParser::new(RequestLimits {
            max_bulk_len: limits.max_bulk_len,
            max_array_len: limits.max_array_len,
            max_request_bytes: limits.max_request_bytes,
        }),
        state: ConnState::default(),
        raw: false,
    };
    let replies = ReplySide {
        links: &links,
        rx,
        scanner: ReplyScanner::new(limits.max_reply_depth, limits.max_bulk_len),
        pending: 0,
        blocking: false,
        effect: None,
        next: None,
    };
    // The upstream write half is only borrowed by the request side: dropping it would
    // half-close the socket, and Redis discards replies still owed to a half-closed client.
    tokio::join!(
        requests.run(client_read, &mut upstream_write),
        replies.run(upstream_read, client_write),
    );
}

/// Tells a client why it cannot be served, then closes its connection.
async fn refuse(client: Stream, upstream: &str, error: &std::io::Error) {
    let msg =
        format!("ERR stormwall: cannot reach upstream Redis at {upstream} ({error}); retry later");
    let (_, mut w) = client.into_split();
    let _ = w.write_all(&error_reply(&msg)).await;
    let _ = w.shutdown().await;
}

/// State the two halves of one session share.
struct Links<'a> {
    ctx: &'a Context,
    /// Cancelled when either half hits a fatal error; the other half then stops too.
    dead: CancellationToken,
    /// Entries enqueued but not yet fully answered (for the idle timeout, and so an
    /// invalidation starts only after the commands before it have executed).
    inflight: AtomicUsize,
    /// Notified when `inflight` drops to zero.
    drained: Notify,
    /// Who this connection acts as, as confirmed by Redis's replies.
    identity: Mutex<Identity>,
}

impl Links<'_> {
    /// One entry fully answered.
    fn answered(&self) {
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Lock-free when nobody waits: it only stores a permit.
            self.drained.notify_one();
        }
    }
}

struct RequestSide<'a> {
    links: &'a Links<'a>,
    tx: mpsc::Sender<Entry>,
    parser: RequestParser,
    state: ConnState,
    raw: bool,
}

/// Connection state the request side tracks as commands go by.
#[derive(Default)]
struct ConnState {
    in_multi: bool,
    /// A raw-mode command (e.g. `SUBSCRIBE`) was queued in this transaction; `EXEC` runs it.
    multi_enters_raw: bool,
    /// The identity changed in a way not tracked (inside a transaction); from then on
    /// invalidations pass through ungoverned rather than run as the wrong identity.
    identity_unknown: bool,
}

impl ConnState {
    /// Applies `MULTI` state: inside a transaction Redis queues commands (one `+QUEUED`
    /// each), so only the commands that end or escape it keep their special meaning (G7:
    /// invalidations inside a transaction pass through ungoverned).
    fn transaction_aware(&mut self, kind: Kind) -> Kind {
        match (self.in_multi, kind) {
            (true, Kind::Identity) => {
                // Takes effect at EXEC, if the transaction runs; not worth modelling.
                self.identity_unknown = true;
                Kind::Plain
            }
            (true, Kind::Delete | Kind::Flush { .. }) => Kind::Plain,
            (false, Kind::Multi) => {
                self.in_multi = true;
                Kind::Multi
            }
            (_, Kind::Exec) if std::mem::take(&mut self.multi_enters_raw) => {
                self.in_multi = false;
                Kind::EntersRaw
            }
            (_, Kind::Exec | Kind::Discard | Kind::Reset) => {
                self.in_multi = false;
                self.multi_enters_raw = false;
                kind
            }
            (true, Kind::EntersRaw) => {
                self.multi_enters_raw = true;
                Kind::Plain
            }
            (true, Kind::Blocking | Kind::Multi) => Kind::Plain,
            (_, kind) => kind,
        }
    }
}

/// Whether the request side keeps reading after processing a buffer.
enum Next {
    Read,
    Stop,
}

impl RequestSide<'_> {
    async fn run(mut self, mut client: ReadHalf, upstream: &mut WriteHalf) {
        let ctx = self.links.ctx;
        let idle = ctx.config.listen.idle_timeout;
        let mut buf = BytesMut::with_capacity(READ_BUF);
        // Registered once: polling a fresh `cancelled()` per command would take the token's
        // lock twice per command, and the shutdown token is shared by every session.
        let links = self.links;
        let dead = links.dead.cancelled();
        let shutdown = ctx.shutdown.cancelled();
        tokio::pin!(dead, shutdown);
        loop {
            if buf.capacity() - buf.len() < MIN_READ {
                buf.reserve(READ_BUF);
            }
            let read = tokio::select! {
                biased;
                _ = &mut dead => return,
                _ = &mut shutdown => return,
                r = read_within(&mut client, &mut buf, idle) => r,
            };
            let Some(read) = read else {
                if self.raw || self.links.inflight.load(Ordering::Relaxed) > 0 {
                    continue;
                }
                debug!("closing idle client");
                return;
            };
            match read {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => {
                    debug!(error = %e, "client read failed");
                    return;
                }
            }
            let next = if self.raw {
                let len = buf.len();
                self.forward(upstream, &mut buf, len).await
            } else {
                self.process(upstream, &mut buf).await
            };
            if let Next::Stop = next {
                return;
            }
        }
    }

    /// Frames every complete command in `buf`, enqueues their entries, and forwards them.
    async fn process(&mut self, upstream: &mut WriteHalf, buf: &mut BytesMut) -> Next {
        let mut scanned = 0;
        let mut run = 0u32;
        let mut blocking = false;
        loop {
            let parsed = match self.parser.parse(&buf[scanned..]) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    return self
                        .protocol_error(upstream, buf, scanned, run, blocking, e)
                        .await;
                }
            };
            let cmd = match &parsed {
                Parsed::Empty { .. } => {
                    scanned += parsed.len();
                    continue;
                }
                Parsed::Multibulk { .. } => self.parser.command(&buf[scanned..]),
                Parsed::Inline { args, .. } => Command::Inline { args },
            };
            let kind = self.state.transaction_aware(policy::classify(&cmd));
            let start = scanned;
            let len = parsed.len();
            match kind {
                Kind::Delete | Kind::Flush { .. } if self.governs() => {
                    let request = match kind {
                        Kind::Flush { all, sync } => Request::Flush { all, sync },
                        _ => Request::Delete {
                            keys: (1..cmd.argc())
                                .filter_map(|i| cmd.arg(i))
                                .map(Bytes::copy_from_slice)
                                .collect(),
                        },
                    };
                    drop(parsed);
                    // Everything before the invalidation goes out first and must have executed
                    // before it runs; everything after waits until it has been applied (G3).
                    self.enqueue_run(run, blocking).await;
                    (run, blocking) = (0, false);
                    if let Next::Stop = self.forward(upstream, buf, start).await {
                        return Next::Stop;
                    }
                    buf.advance(len);
                    scanned = 0;
                    let Some(reply) = self.govern(request).await else {
                        return Next::Stop;
                    };
                    self.enqueue(Entry::Local(reply)).await;
                    continue;
                }
                Kind::Identity | Kind::Reset if !self.state.in_multi => {
                    let effect = if kind == Kind::Reset {
                        Some(Effect::Reset)
                    } else {
                        Effect::of(&cmd)
                    };
                    drop(parsed);
                    scanned += len;
                    self.enqueue_run(run, blocking).await;
                    (run, blocking) = (0, false);
                    self.enqueue(Entry::Upstream {
                        count: 1,
                        blocking: false,
                        effect,
                    })
                    .await;
                    continue;
                }
                _ => {}
            }
            drop(parsed);
            scanned += len;
            match kind {
                Kind::Plain
                | Kind::Multi
                | Kind::Exec
                | Kind::Discard
                | Kind::Reset
                | Kind::Identity
                | Kind::Delete
                | Kind::Flush { .. } => run += 1,
                Kind::Blocking => {
                    run += 1;
                    blocking = true;
                }
                Kind::Quit => {
                    // Redis answers QUIT and closes; nothing after it is read.
                    run += 1;
                    self.enqueue_run(run, blocking).await;
                    self.forward(upstream, buf, scanned).await;
                    return Next::Stop;
                }
                Kind::EntersRaw => {
                    self.enqueue_run(run, blocking).await;
                    self.enqueue(Entry::Raw).await;
                    self.raw = true;
                    debug!(from_byte = start, "relaying raw from here on");
                    let len = buf.len();
                    return self.forward(upstream, buf, len).await;
                }
            }
        }
        self.enqueue_run(run, blocking).await;
        self.forward(upstream, buf, scanned).await
    }

    /// Whether invalidations on this connection go through the engine.
    fn governs(&self) -> bool {
        self.links.ctx.config.invalidation.enabled && !self.state.identity_unknown
    }

    /// Runs one invalidation through the engine once every earlier command has executed, and
    /// returns its reply. `None` if the session died meanwhile.
    async fn govern(&mut self, request: Request) -> Option<Bytes> {
        let links = self.links;
        while links.inflight.load(Ordering::Acquire) > 0 {
            tokio::select! {
                _ = links.drained.notified() => {}
                _ = links.dead.cancelled() => return None,
            }
        }
        let who = links
            .identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Some(links.ctx.engine.execute(&who, request).await)
    }

    /// Forwards the commands framed before the bad input, then answers with the protocol
    /// error and stops reading; the reply side closes the connection after delivering it.
    async fn protocol_error(
        &mut self,
        upstream: &mut WriteHalf,
        buf: &mut BytesMut,
        scanned: usize,
        run: u32,
        blocking: bool,
        error: ProtocolError,
    ) -> Next {
        debug!(%error, "client protocol error; closing after pending replies");
        self.parser.reset();
        self.enqueue_run(run, blocking).await;
        self.enqueue(Entry::Local(error.to_reply())).await;
        self.forward(upstream, buf, scanned).await;
        Next::Stop
    }

    async fn enqueue_run(&self, count: u32, blocking: bool) {
        if count > 0 {
            self.enqueue(Entry::Upstream {
                count,
                blocking,
                effect: None,
            })
            .await;
        }
    }

    async fn enqueue(&self, entry: Entry) {
        if !matches!(entry, Entry::Raw) {
            self.links.inflight.fetch_add(1, Ordering::Relaxed);
        }
        // The receiver only goes away when the session is dying; nothing to do then.
        let _ = self.tx.send(entry).await;
    }

    /// Writes `buf[..len]` to Redis and consumes it.
    async fn forward(&self, upstream: &mut WriteHalf, buf: &mut BytesMut, len: usize) -> Next {
        if len == 0 {
            return Next::Read;
        }
        let result = upstream.write_all(&buf[..len]).await;
        buf.advance(len);
        match result {
            Ok(()) => Next::Read,
            Err(e) => {
                debug!(error = %e, "upstream write failed");
                self.links.dead.cancel();
                Next::Stop
            }
        }
    }
}

/// Reads into `buf`; `None` if nothing arrived within `idle` (zero: wait forever).
async fn read_within(
    client: &mut ReadHalf,
    buf: &mut BytesMut,
    idle: std::time::Duration,
) -> Option<std::io::Result<usize>> {
    if idle.is_zero() {
        Some(client.read_buf(buf).await)
    } else {
        tokio::time::timeout(idle, client.read_buf(buf)).await.ok()
    }
}

struct ReplySide<'a> {
    links: &'a Links<'a>,
    rx: mpsc::Receiver<Entry>,
    scanner: ReplyScanner,
    /// Replies still owed by Redis for the current `Upstream` entry.
    pending: u32,
    /// The current entry contains a blocking command (no reply timeout).
    blocking: bool,
    /// The current entry's identity change, applied if its reply is not an error.
    effect: Option<Effect>,
    /// An entry received while waiting, to be handled before the queue is polled again.
    next: Option<Entry>,
}

/// Why the reply side stopped.
enum End {
    /// Everything owed was delivered (client finished, or the session drained).
    Done,
    /// Relay raw bytes from now on.
    Raw,
    /// Redis is gone or misbehaving; owed replies become errors.
    Failed(&'static str),
}

impl ReplySide<'_> {
    async fn run(mut self, mut upstream: ReadHalf, mut client: WriteHalf) {
        let mut buf = BytesMut::with_capacity(READ_BUF);
        let end = self.pump(&mut upstream, &mut client, &mut buf).await;
        match end {
            End::Done => {}
            End::Raw => self.relay(&mut upstream, &mut client, &mut buf).await,
            End::Failed(reason) => self.fail(&mut client, reason).await,
        }
        self.links.dead.cancel();
        let _ = client.shutdown().await;
    }

    async fn pump(
        &mut self,
        upstream: &mut ReadHalf,
        client: &mut WriteHalf,
        buf: &mut BytesMut,
    ) -> End {
        let ctx = self.links.ctx;
        let reply_timeout = ctx.config.upstream.reply_timeout;
        // The reply timer is re-armed lazily (when it fires early, from `progress`), so a
        // busy connection costs no timer operations per reply.
        let timer = tokio::time::sleep(reply_timeout);
        let links = self.links;
        let dead = links.dead.cancelled();
        tokio::pin!(timer, dead);
        let mut progress = Instant::now();
        let mut queue_open = true;
        loop {
            // Deliver everything possible without waiting.
            let mut ready = 0;
            loop {
                if self.pending == 0 && queue_open {
                    let entry = match self.next.take() {
                        Some(e) => Some(e),
                        None => match self.rx.try_recv() {
                            Ok(e) => Some(e),
                            Err(mpsc::error::TryRecvError::Empty) => None,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                queue_open = false;
                                None
                            }
                        },
                    };
                    match entry {
                        Some(Entry::Upstream {
                            count,
                            blocking,
                            effect,
                        }) => {
                            progress = Instant::now();
                            self.pending = count;
                            self.blocking = blocking;
                            self.effect = effect;
                        }
                        Some(Entry::Local(reply)) => {
                            if !self.write(client, buf, &mut ready).await
                                || client.write_all(&reply).await.is_err()
                            {
                                return End::Done;
                            }
                            self.links.answered();
                            continue;
                        }
                        Some(Entry::Raw) => {
                            return if self.write(client, buf, &mut ready).await {
                                End::Raw
                            } else {
                                End::Done
                            };
                        }
                        None => {}
                    }
                }
                match self.scanner.next(&buf[ready..]) {
                    Ok(None) => break,
                    Ok(Some((len, FrameKind::Push))) => ready += len,
                    Ok(Some((len, FrameKind::Reply))) => {
                        if self.pending == 0 {
                            let _ = self.write(client, buf, &mut ready).await;
                            warn!(
                                "upstream sent a reply no request is waiting for; closing the client connection"
                            );
                            return End::Failed(DESYNC);
                        }
                        // An identity command counts only if Redis accepted it.
                        if let Some(effect) = self.effect.take()
                            && buf[ready] != b'-'
                        {
                            let mut who = self
                                .links
                                .identity
                                .lock()
                                .unwrap_or_else(|p| p.into_inner());
                            effect.apply(&mut who);
                        }
                        ready += len;
                        self.pending -= 1;
                        if self.pending == 0 {
                            self.links.answered();
                        }
                    }
                    Err(e) => {
                        let _ = self.write(client, buf, &mut ready).await;
                        warn!(error = %e, "invalid reply from upstream; closing the client connection");
                        return End::Failed(DESYNC);
                    }
                }
            }
            if !self.write(client, buf, &mut ready).await {
                return End::Done;
            }
            if self.pending == 0 && !queue_open {
                return End::Done;
            }
            if buf.capacity() - buf.len() < MIN_READ {
                buf.reserve(READ_BUF);
            }
            let timed = self.pending > 0 && !self.blocking && !reply_timeout.is_zero();
            if timed {
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + reply_timeout);
            }
            tokio::select! {
                biased;
                _ = self.links.dead.cancelled() => return End::Failed(LOST),
                entry = self.rx.recv(), if self.pending == 0 && queue_open => match entry {
                    Some(e) => self.next = Some(e),
                    None => queue_open = false,
                },
                read = upstream.read_buf(buf) => match read {
                    Ok(0) => return End::Failed(LOST),
                    Ok(_) => progress = Instant::now(),
                    Err(e) => {
                        debug!(error = %e, "upstream read failed");
                        return End::Failed(LOST);
                    }
                },
                _ = &mut timer, if timed => {
                    let deadline = progress + reply_timeout;
                    if Instant::now() < deadline {
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                    warn!(timeout = %humantime::format_duration(reply_timeout), "upstream did not reply in time; closing the client connection");
                    return End::Failed(TIMED_OUT);
                }
            }
        }
    }

    /// Writes `buf[..*ready]` to the client and consumes it. False if the client is gone.
    async fn write(&self, client: &mut WriteHalf, buf: &mut BytesMut, ready: &mut usize) -> bool {
        if *ready == 0 {
            return true;
        }
        let ok = client.write_all(&buf[..*ready]).await.is_ok();
        buf.advance(*ready);
        *ready = 0;
        if !ok {
            self.links.dead.cancel();
        }
        ok
    }

    /// Relays bytes both ways' worth of replies until either side closes (raw mode).
    async fn relay(&mut self, upstream: &mut ReadHalf, client: &mut WriteHalf, buf: &mut BytesMut) {
        let links = self.links;
        let dead = links.dead.cancelled();
        let shutdown = links.ctx.shutdown.cancelled();
        tokio::pin!(dead, shutdown);
        loop {
            if !buf.is_empty() {
                if client.write_all(buf).await.is_err() {
                    return;
                }
                buf.clear();
            }
            if buf.capacity() < MIN_READ {
                buf.reserve(READ_BUF);
            }
            tokio::select! {
                biased;
                _ = &mut dead => return,
                _ = &mut shutdown => return,
                // The request side dropped its sender: the client is gone.
                None = self.rx.recv() => return,
                read = upstream.read_buf(buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
            }
        }
    }

    /// Answers every command still owed a reply with `reason`, keeping local replies in place.
    async fn fail(&mut self, client: &mut WriteHalf, reason: &'static str) {
        self.links.dead.cancel();
        self.rx.close();
        let err = error_reply(reason);
        let mut out = BytesMut::new();
        let mut owed = u64::from(self.pending);
        let push = |entry: Entry, owed: &mut u64, out: &mut BytesMut| match entry {
            Entry::Upstream { count, .. } => *owed += u64::from(count),
            Entry::Local(reply) => {
                for _ in 0..std::mem::take(owed) {
                    out.extend_from_slice(&err);
                }
                out.extend_from_slice(&reply);
            }
            Entry::Raw => {}
        };
        if let Some(e) = self.next.take() {
            push(e, &mut owed, &mut out);
        }
        while let Ok(e) = self.rx.try_recv() {
            push(e, &mut owed, &mut out);
        }
        for _ in 0..owed {
            out.extend_from_slice(&err);
        }
        if !out.is_empty() {
            debug!(reason, "failing commands still owed a reply");
            let _ = client.write_all(&out).await;
        }
    }
}
