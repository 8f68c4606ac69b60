//! The reply side of a session: Redis's bytes in, framed, matched to queued entries, and
//! written back to the client unchanged — interleaved with the replies stormwall made.

use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::queue::{Effect, Entry, Pop};
use super::{Links, MIN_READ, READ_BUF};
use crate::net::{ReadHalf, WriteHalf};
use crate::resp::error_reply;
use crate::resp::reply::{FrameKind, ReplyScanner};

const LOST: &str = "ERR stormwall: connection to upstream Redis lost before the reply; \
                    the command may or may not have been applied";
const TIMED_OUT: &str = "ERR stormwall: upstream Redis did not reply within \
                         upstream.reply_timeout; the command may or may not have been applied";
const DESYNC: &str = "ERR stormwall: unexpected reply from upstream Redis; the command may or \
                      may not have been applied";

/// How long the error replies for a failed connection may take to reach the client.
const FINAL_WRITE: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) struct ReplySide<'a> {
    pub links: &'a Links<'a>,
    pub scanner: ReplyScanner,
    /// The entry being answered: replies still owed by Redis for it …
    pub pending: u32,
    /// … whether it contains a blocking command (no reply timeout) …
    pub blocking: bool,
    /// … the state change its reply confirms …
    pub effect: Option<Effect>,
    /// … and when it was sent.
    pub sent: Instant,
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
    pub(super) async fn run(mut self, mut upstream: ReadHalf, mut client: WriteHalf) {
        let mut buf = BytesMut::with_capacity(READ_BUF);
        let end = self.pump(&mut upstream, &mut client, &mut buf).await;
        match end {
            End::Done => {}
            End::Raw => self.relay(&mut upstream, &mut client, &mut buf).await,
            End::Failed(reason) => self.fail(&mut client, reason).await,
        }
        self.links.dead.cancel();
        let _ = self.links.queue.abandon();
        let _ = client.shutdown().await;
    }

    async fn pump(
        &mut self,
        upstream: &mut ReadHalf,
        client: &mut WriteHalf,
        buf: &mut BytesMut,
    ) -> End {
        let links = self.links;
        let metrics = &links.ctx.metrics;
        let reply_timeout = links.config.upstream.reply_timeout;
        // Re-armed lazily (when it fires early, from `progress`), so a busy connection costs
        // no timer operations per reply.
        let timer = tokio::time::sleep(reply_timeout);
        let dead = links.dead.cancelled();
        tokio::pin!(timer, dead);
        let mut progress = Instant::now();
        let mut finished = false;
        loop {
            // Deliver everything possible without waiting.
            let mut ready = 0;
            loop {
                if self.pending == 0 && !finished {
                    match links.queue.try_pop() {
                        Pop::Entry(Entry::Upstream {
                            count,
                            blocking,
                            effect,
                            sent,
                        }) => {
                            progress = Instant::now();
                            (self.pending, self.blocking, self.effect, self.sent) =
                                (count, blocking, effect, sent);
                        }
                        Pop::Entry(Entry::Local(reply)) => {
                            if !self.write(client, buf, &mut ready).await
                                || client.write_all(&reply).await.is_err()
                            {
                                return End::Done;
                            }
                            links.queue.answered();
                            continue;
                        }
                        Pop::Entry(Entry::Raw) => {
                            return if self.write(client, buf, &mut ready).await {
                                End::Raw
                            } else {
                                End::Done
                            };
                        }
                        Pop::Empty => {}
                        Pop::Finished => finished = true,
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
                            metrics.upstream_protocol.increment(1);
                            return End::Failed(DESYNC);
                        }
                        if let Some(effect) = self.effect.take() {
                            self.confirm(effect, buf[ready] != b'-');
                        }
                        ready += len;
                        self.pending -= 1;
                        if self.pending == 0 {
                            metrics
                                .upstream_rtt
                                .record(self.sent.elapsed().as_secs_f64());
                            links.queue.answered();
                        }
                    }
                    Err(e) => {
                        let _ = self.write(client, buf, &mut ready).await;
                        warn!(error = %e, "invalid reply from upstream; closing the client connection");
                        metrics.upstream_protocol.increment(1);
                        return End::Failed(DESYNC);
                    }
                }
            }
            if !self.write(client, buf, &mut ready).await {
                return End::Done;
            }
            if self.pending == 0 && finished {
                return End::Done;
            }
            if buf.capacity() - buf.len() < MIN_READ {
                buf.reserve(READ_BUF);
            }
            let timed = self.pending > 0 && !self.blocking && !reply_timeout.is_zero();
            tokio::select! {
                biased;
                _ = &mut dead => return End::Failed(LOST),
                _ = links.queue.wait_pushed(), if self.pending == 0 && !finished => {}
                read = upstream.read_buf(buf) => match read {
                    Ok(n) if n > 0 => progress = Instant::now(),
                    // After the client's own EOF, Redis closing is the expected end.
                    _ if links.client_gone.load(Ordering::Acquire) => return End::Done,
                    Ok(_) => {
                        metrics.upstream_lost.increment(1);
                        return End::Failed(LOST);
                    }
                    Err(e) => {
                        debug!(error = %e, "upstream read failed");
                        metrics.upstream_lost.increment(1);
                        return End::Failed(LOST);
                    }
                },
                _ = &mut timer, if timed => {
                    let deadline = progress + reply_timeout;
                    if Instant::now() < deadline {
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                    if links.ctx.log_throttle.allow() {
                        warn!(timeout = %humantime::format_duration(reply_timeout), "upstream did not reply in time; closing the client connection");
                    }
                    metrics.upstream_timeout.increment(1);
                    return End::Failed(TIMED_OUT);
                }
            }
        }
    }

    /// Applies a state change once Redis has answered the command that asked for it.
    fn confirm(&self, effect: Effect, accepted: bool) {
        match effect {
            Effect::Multi if !accepted => self.links.multi_refused.store(true, Ordering::Release),
            Effect::Multi => {}
            // An identity command counts only if Redis accepted it.
            effect if accepted => effect.apply(
                &mut self
                    .links
                    .identity
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            ),
            _ => {}
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

    /// Relays Redis's bytes to the client until either side closes (raw mode).
    async fn relay(&mut self, upstream: &mut ReadHalf, client: &mut WriteHalf, buf: &mut BytesMut) {
        let links = self.links;
        let dead = links.dead.cancelled();
        let shutdown = links.shutdown.cancelled();
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
        let err = error_reply(reason);
        let mut out = BytesMut::new();
        let mut owed = u64::from(self.pending);
        for entry in self.links.queue.abandon() {
            match entry {
                Entry::Upstream { count, .. } => owed += u64::from(count),
                Entry::Local(reply) => {
                    for _ in 0..std::mem::take(&mut owed) {
                        out.extend_from_slice(&err);
                    }
                    out.extend_from_slice(&reply);
                }
                Entry::Raw => {}
            }
        }
        for _ in 0..owed {
            out.extend_from_slice(&err);
        }
        if !out.is_empty() {
            debug!(reason, "failing commands still owed a reply");
            // A client that is not reading must not keep the session (and its slot) alive.
            let _ = tokio::time::timeout(FINAL_WRITE, client.write_all(&out)).await;
        }
    }
}
