//! The reply side of a session: Redis's bytes in, framed, matched to queued entries, and
//! written back to the client unchanged — interleaved with the replies stormwall made.

use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, warn};

use bytes::Bytes;

use super::link::Replies;
use super::queue::{Entry, Pop};
use super::state::Effect;
use super::{Links, MIN_READ, READ_BUF};
use crate::net::{ReadHalf, WriteHalf};
use crate::resp::reply::{FrameKind, ReplyScanner};

pub(super) struct ReplySide<'a> {
    pub links: &'a Links<'a>,
    pub scanner: ReplyScanner,
    /// The entry being answered: replies still owed by Redis for it …
    pub pending: u32,
    /// … whether it contains a blocking command (no reply timeout) …
    pub blocking: bool,
    /// … the state change its reply confirms …
    pub effect: Option<Effect>,
    /// … or the bytes the client gets in place of that reply (none for a probe) …
    pub replace: Option<Bytes>,
    /// … and when it was sent.
    pub sent: Instant,
}

/// Why the reply side stopped.
pub(super) enum End {
    /// Everything owed was delivered (client finished, or the session drained).
    Done,
    /// Relay raw bytes from now on.
    Raw,
    /// Redis is gone or misbehaving: the client connection is closed, as Redis's would be.
    Failed,
}

impl ReplySide<'_> {
    pub(super) async fn run(mut self, mut upstream: Replies, mut client: WriteHalf) {
        // Allocated when the first replies arrive (crate::buffers).
        let mut buf = BytesMut::new();
        let end = self.pump(&mut upstream, &mut client, &mut buf).await;
        match end {
            End::Done => {}
            End::Raw => match &mut upstream {
                Replies::Socket(read) => self.relay(read, &mut client, &mut buf).await,
                // Commands that enter raw relaying move a shared client to a socket first.
                Replies::Shared(_) => {
                    warn!("raw relaying on a shared connection; closing the client")
                }
            },
            End::Failed => {
                if self.pending > 0 || !self.links.queue.is_drained() {
                    debug!("closing the client connection with replies still owed");
                }
            }
        }
        self.links.dead.cancel();
        let _ = self.links.queue.abandon();
        let _ = client.shutdown().await;
    }

    async fn pump(
        &mut self,
        upstream: &mut Replies,
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
                        Pop::Entry(Entry::Replace(reply)) => {
                            progress = Instant::now();
                            (self.pending, self.blocking, self.replace, self.sent) =
                                (1, false, Some(reply), Instant::now());
                        }
                        Pop::Entry(Entry::Cluster(dispatch)) => {
                            if !self.write(client, buf, &mut ready).await {
                                return End::Done;
                            }
                            let resolved = tokio::select! {
                                biased;
                                _ = &mut dead => return End::Failed,
                                r = self.resolve(*dispatch) => r,
                            };
                            let reply = match resolved {
                                Ok(reply) => reply,
                                Err(end) => return end,
                            };
                            progress = Instant::now();
                            if !self.send(client, &reply).await {
                                return End::Done;
                            }
                            links.queue.answered();
                            continue;
                        }
                        Pop::Entry(Entry::Local(reply)) => {
                            if !self.write(client, buf, &mut ready).await
                                || !self.send(client, &reply).await
                            {
                                return End::Done;
                            }
                            links.queue.answered();
                            continue;
                        }
                        Pop::Entry(Entry::Probe) => {
                            progress = Instant::now();
                            (self.pending, self.blocking, self.sent) = (1, false, Instant::now());
                            (self.effect, self.replace) =
                                (Some(Effect::AuthProbe), Some(Bytes::new()));
                        }
                        Pop::Entry(Entry::Switch(private)) => {
                            if !self.write(client, buf, &mut ready).await {
                                return End::Done;
                            }
                            if !buf.is_empty() {
                                warn!(
                                    "bytes left from the shared connection when moving to a private one; closing the client connection"
                                );
                                metrics.upstream_protocol.increment(1);
                                return End::Failed;
                            }
                            *upstream = Replies::Socket(private.0);
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
                            return End::Failed;
                        }
                        if let Some(effect) = self.effect.take() {
                            links.confirm(effect, &buf[ready..ready + len]);
                        }
                        if let Some(reply) = self.replace.take() {
                            if !self.write(client, buf, &mut ready).await {
                                return End::Done;
                            }
                            buf.advance(len);
                            if !self.send(client, &reply).await {
                                return End::Done;
                            }
                        } else {
                            ready += len;
                        }
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
                        return End::Failed;
                    }
                }
            }
            if !self.write(client, buf, &mut ready).await {
                return End::Done;
            }
            if self.pending == 0 && finished {
                return End::Done;
            }
            if let Replies::Shared(_) = upstream {
                // Nothing held: an idle shared client keeps no buffer (its inbox lends one
                // with the next replies).
                crate::buffers::give(buf);
            }
            let timed = self.pending > 0 && !self.blocking && !reply_timeout.is_zero();
            tokio::select! {
                biased;
                _ = &mut dead => return End::Failed,
                _ = links.queue.wait_pushed(), if self.pending == 0 && !finished => {}
                read = upstream.read_buf(buf) => match read {
                    Ok(n) if n > 0 => progress = Instant::now(),
                    // After the client's own EOF, Redis closing is the expected end.
                    _ if links.client_gone.load(Ordering::Acquire) => return End::Done,
                    Ok(_) => {
                        metrics.upstream_lost.increment(1);
                        return End::Failed;
                    }
                    Err(e) => {
                        debug!(error = %e, "upstream read failed");
                        metrics.upstream_lost.increment(1);
                        return End::Failed;
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
                    return End::Failed;
                }
            }
        }
    }

    /// Writes `buf[..*ready]` to the client and consumes it. False if the client is gone.
    async fn write(&self, client: &mut WriteHalf, buf: &mut BytesMut, ready: &mut usize) -> bool {
        if *ready == 0 {
            return true;
        }
        let ok = self.send(client, &buf[..*ready]).await;
        buf.advance(*ready);
        *ready = 0;
        ok
    }

    /// Writes `bytes` to the client. While the client is not reading (the write does not
    /// complete at once), the request side is told, so it never waits for replies that
    /// cannot be delivered. False if the client is gone.
    async fn send(&self, client: &mut WriteHalf, bytes: &[u8]) -> bool {
        let links = self.links;
        let write = client.send_all(bytes);
        tokio::pin!(write);
        let first = tokio::select! {
            biased;
            r = &mut write => Some(r),
            _ = std::future::ready(()) => None,
        };
        let result = match first {
            Some(r) => r,
            None => {
                links.client_blocked.store(true, Ordering::Release);
                links.blocked.notify_waiters();
                let r = write.await;
                links.client_blocked.store(false, Ordering::Release);
                r
            }
        };
        if result.is_err() {
            links.dead.cancel();
        }
        result.is_ok()
    }

    /// Relays Redis's bytes to the client until either side closes (raw mode).
    async fn relay(&mut self, upstream: &mut ReadHalf, client: &mut WriteHalf, buf: &mut BytesMut) {
        let links = self.links;
        let dead = links.dead.cancelled();
        let shutdown = links.shutdown.cancelled();
        tokio::pin!(dead, shutdown);
        loop {
            if !buf.is_empty() {
                if client.send_all(buf).await.is_err() {
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
}
