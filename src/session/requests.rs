//! The request side of a session: client bytes in, framed and classified, forwarded to
//! Redis exactly as they came — or, for a governed invalidation, handed to the engine.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::debug;

use super::queue::{Effect, Entry};
use super::{Links, MIN_READ, READ_BUF};
use crate::invalidation::{Request, Verdict};
use crate::net::{ReadHalf, WriteHalf};
use crate::policy::{self, Kind};
use crate::resp::ProtocolError;
use crate::resp::request::{Command, Parsed, RequestParser};

pub(super) struct RequestSide<'a> {
    pub links: &'a Links<'a>,
    pub parser: RequestParser,
    pub state: ConnState,
    pub raw: bool,
    /// When the bytes being processed were read (for the overhead histogram).
    pub read_at: Instant,
}

/// Connection state the request side tracks as commands go by.
#[derive(Default)]
pub(super) struct ConnState {
    /// `MULTI` was sent and (as far as is known yet) accepted.
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
            // Queued, so it cannot block now; nested MULTI is an error reply.
            (true, Kind::Blocking | Kind::Multi) => Kind::Plain,
            (_, kind) => kind,
        }
    }

    /// Redis refused a `MULTI` this side had assumed accepted.
    fn multi_refused(&mut self) {
        self.in_multi = false;
        self.multi_enters_raw = false;
    }
}

/// How long a client that stopped in the middle of a line over 64 KiB may pause before the
/// line is judged as Redis judges it at the end of a read (refused).
const LINE_PAUSE: Duration = Duration::from_millis(50);

/// How long an invalidation waits for the replies to earlier commands on its connection
/// before giving up on governing it (see [`Settled::NotYet`]). Replies normally arrive within
/// a round trip; a client that writes a whole pipeline before reading never lets them.
const SETTLE_LIMIT: Duration = Duration::from_millis(100);

/// Whether everything sent before has been answered.
enum Settled {
    Yes,
    /// Not within the limit.
    NotYet,
    /// The session is ending.
    Stop,
}

/// Whether the request side keeps reading after processing a buffer.
pub(super) enum Next {
    Read,
    Stop,
}

/// Commands framed so far in the current buffer and not yet queued.
#[derive(Default)]
struct Run {
    count: u32,
    blocking: bool,
}

impl RequestSide<'_> {
    pub(super) async fn run(mut self, mut client: ReadHalf, upstream: &mut WriteHalf) {
        let links = self.links;
        let idle = links.config.listen.idle_timeout;
        let mut buf = BytesMut::with_capacity(READ_BUF);
        // Registered once: polling a fresh `cancelled()` per command would take the token's
        // lock twice per command, and the shutdown token is shared by every session.
        let dead = links.dead.cancelled();
        let shutdown = links.shutdown.cancelled();
        tokio::pin!(dead, shutdown);
        loop {
            if buf.capacity() - buf.len() < MIN_READ {
                buf.reserve(READ_BUF);
            }
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
                let next = self.process(upstream, &mut buf).await;
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
                        if let Next::Stop = self.process(upstream, &mut buf).await {
                            return;
                        }
                    }
                    // Redis treats a client's EOF as the end of the connection (dropping a
                    // blocked BLPOP, say); passing the EOF on makes it do just that.
                    links.client_gone.store(true, Ordering::Release);
                    let _ = upstream.shutdown().await;
                    return;
                }
                Ok(_) => self.read_at = Instant::now(),
                Err(e) => {
                    debug!(error = %e, "client read failed");
                    links.client_gone.store(true, Ordering::Release);
                    let _ = upstream.shutdown().await;
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

    /// Frames every complete command in `buf`, queues their entries, and forwards them.
    async fn process(&mut self, upstream: &mut WriteHalf, buf: &mut BytesMut) -> Next {
        let mut scanned = 0;
        let mut run = Run::default();
        loop {
            // A plain load first: this runs per command, the swap almost never.
            let refused = &self.links.multi_refused;
            if refused.load(Ordering::Acquire) && refused.swap(false, Ordering::AcqRel) {
                self.state.multi_refused();
            }
            let parsed = match self.parser.parse(&buf[scanned..]) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return self.protocol_error(upstream, buf, scanned, run, e).await,
            };
            let cmd = match &parsed {
                Parsed::Empty { .. } => {
                    scanned += parsed.len();
                    continue;
                }
                Parsed::Multibulk { .. } => self.parser.command(&buf[scanned..]),
                Parsed::Inline { args, .. } => Command::Inline { args },
            };
            let raw_kind = policy::classify(&cmd);
            if self.state.in_multi && raw_kind == Kind::EntersRaw && !self.links.queue.is_drained()
            {
                // Whether this command is queued by a transaction or enters pub/sub now
                // depends on whether Redis accepted the MULTI: find out before deciding.
                drop(parsed);
                if let Settled::Stop = self
                    .settle(upstream, buf, &mut scanned, &mut run, None)
                    .await
                {
                    return Next::Stop;
                }
                continue;
            }
            let kind = self.state.transaction_aware(raw_kind);
            let len = parsed.len();
            let effect = match kind {
                Kind::Multi => Some(Effect::Multi),
                Kind::Reset => Some(Effect::Reset),
                Kind::Identity if !self.state.in_multi => Effect::of(&cmd),
                _ => None,
            };
            let governed = match kind {
                Kind::Delete | Kind::Flush { .. } if self.governs() => Some(match kind {
                    Kind::Flush { all, sync } => Request::Flush { all, sync },
                    _ => Request::Delete {
                        unlink: cmd
                            .arg(0)
                            .is_some_and(|n| n.eq_ignore_ascii_case(b"UNLINK")),
                        keys: (1..cmd.argc())
                            .filter_map(|i| cmd.arg(i))
                            .map(Bytes::copy_from_slice)
                            .collect(),
                    },
                }),
                _ => None,
            };
            drop(parsed);
            if let Some(request) = governed {
                // Everything before the invalidation goes out first and must have executed
                // before it runs; everything after waits until it has been applied (G3).
                match self
                    .settle(upstream, buf, &mut scanned, &mut run, Some(SETTLE_LIMIT))
                    .await
                {
                    Settled::Yes => {}
                    Settled::Stop => return Next::Stop,
                    Settled::NotYet => {
                        // The client has not read the replies to what it sent before (it
                        // writes a whole pipeline first). Waiting could deadlock with it, so
                        // this one passes through: Redis orders it on the client's connection.
                        debug!(
                            "earlier replies still unread; invalidation passes through ungoverned"
                        );
                        scanned = len;
                        run.count += 1;
                        continue;
                    }
                }
                buf.advance(len);
                let Some(reply) = self.govern(request).await else {
                    return Next::Stop;
                };
                self.read_at = Instant::now();
                self.enqueue(Entry::Local(reply)).await;
                continue;
            }
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
                Kind::Quit => {
                    // Redis answers QUIT and closes; nothing after it is read.
                    run.count += 1;
                    self.enqueue_run(&mut run).await;
                    self.forward(upstream, buf, scanned).await;
                    return Next::Stop;
                }
                Kind::EntersRaw => {
                    // Unframe the raw command: it and everything after it go out as bytes.
                    self.enqueue_run(&mut run).await;
                    self.enqueue(Entry::Raw).await;
                    self.raw = true;
                    debug!("relaying raw from here on");
                    let len = buf.len();
                    return self.forward(upstream, buf, len).await;
                }
                _ => run.count += 1,
            }
        }
        self.enqueue_run(&mut run).await;
        self.forward(upstream, buf, scanned).await
    }

    /// Sends everything framed so far and waits until Redis has answered all of it, so the
    /// connection's state (identity, transaction) is known for the next command.
    async fn settle(
        &mut self,
        upstream: &mut WriteHalf,
        buf: &mut BytesMut,
        scanned: &mut usize,
        run: &mut Run,
        limit: Option<Duration>,
    ) -> Settled {
        self.enqueue_run(run).await;
        if let Next::Stop = self.forward(upstream, buf, *scanned).await {
            return Settled::Stop;
        }
        *scanned = 0;
        let links = self.links;
        let limit = async {
            match limit {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = links.queue.drained() => {}
            _ = links.dead.cancelled() => return Settled::Stop,
            _ = limit => return Settled::NotYet,
        }
        if links.multi_refused.swap(false, Ordering::AcqRel) {
            self.state.multi_refused();
        }
        Settled::Yes
    }

    /// Whether invalidations on this connection go through the engine.
    fn governs(&self) -> bool {
        self.links.config.invalidation.enabled && !self.state.identity_unknown
    }

    /// Runs one invalidation through the engine (everything before it has been answered) and
    /// returns its reply. `None` if the session died meanwhile.
    async fn govern(&mut self, request: Request) -> Option<Bytes> {
        let links = self.links;
        let who = links
            .identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        tokio::select! {
            verdict = links.ctx.engine.execute(&who, request) => match verdict {
                Verdict::Reply(reply) => Some(reply),
                // Wired by the session hardening work; until then nothing returns these.
                Verdict::PassThrough | Verdict::Unknown => None,
            },
            // The client is gone; the engine finishes the work on its own.
            _ = links.dead.cancelled() => None,
        }
    }

    /// Forwards the commands framed before the bad input, then answers with the protocol
    /// error and stops reading; the reply side closes the connection after delivering it.
    async fn protocol_error(
        &mut self,
        upstream: &mut WriteHalf,
        buf: &mut BytesMut,
        scanned: usize,
        mut run: Run,
        error: ProtocolError,
    ) -> Next {
        debug!(%error, "client protocol error; closing after pending replies");
        self.links.ctx.metrics.protocol_errors.increment(1);
        self.parser.reset();
        self.enqueue_run(&mut run).await;
        self.enqueue(Entry::Local(error.to_reply())).await;
        self.forward(upstream, buf, scanned).await;
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

    async fn enqueue(&self, entry: Entry) {
        // False only when the reply side is gone, and the session is ending anyway.
        let _ = self.links.queue.push(entry).await;
    }

    /// Writes `buf[..len]` to Redis and consumes it.
    async fn forward(&self, upstream: &mut WriteHalf, buf: &mut BytesMut, len: usize) -> Next {
        if len == 0 {
            return Next::Read;
        }
        let result = upstream.write_all(&buf[..len]).await;
        buf.advance(len);
        self.links
            .ctx
            .metrics
            .overhead
            .record(self.read_at.elapsed().as_secs_f64());
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

impl Effect {
    /// The identity change an `AUTH`/`HELLO … AUTH`/`SELECT` command asks for, if any.
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
