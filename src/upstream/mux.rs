//! One Redis connection carrying many clients' commands (shared mode).
//!
//! Clients append their commands to one output buffer; a writer task sends whatever has
//! accumulated in one write, so Redis reads fifty clients' commands as one pipeline
//! (auto-pipelining across clients). Each append also appends a *route* — "the next N
//! replies belong to this client" — under the same lock, so routes are in exactly the order
//! Redis will answer. A reader task frames Redis's replies and hands each to the oldest
//! route: the client's [`Inbox`], or a [`capture`](Mux::capture) that stormwall reads itself
//! (the answer to a `SELECT` it must check).
//!
//! Only commands with exactly one reply travel here: anything that could answer twice, not
//! at all, or late (blocking, pub/sub, `CLIENT REPLY`) moves its client to a private
//! connection first. So a reply with no route means Redis and stormwall disagree, and the
//! connection is failed rather than risk handing a client someone else's answer.
//!
//! When the connection fails, every client with replies owed on it is failed too (its
//! connection is closed, as Redis's own would be); clients with nothing in flight never
//! notice, and their next command goes to the replacement the pool opens. When the upstream
//! moves, the connection is *retired*: it carries on until the replies owed on it have
//! arrived, while its clients move to a connection to the new upstream as each one's own
//! replies are in.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes, BytesMut};
use metrics::{Gauge, Histogram};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::net::{ReadHalf, WriteHalf};
use crate::resp::reply::{FrameKind, ReplyScanner};

/// Read buffer of a shared connection; it grows for large replies.
const READ_BUF: usize = 64 * 1024;
/// An output buffer larger than this is not kept for reuse after a write.
const KEEP_OUT: usize = 1024 * 1024;
/// Commands waiting to be written beyond which senders wait for the writer (Redis reading
/// slower than clients send): the backpressure a connection of their own would give them.
const OUT_PAUSE: usize = 4 * 1024 * 1024;

/// Where one client's replies arrive, from whichever shared connection carried its commands.
#[derive(Default)]
pub struct Inbox {
    inner: Mutex<InboxInner>,
    ready: Notify,
    /// Replies sent for and not yet received from Redis.
    owed: AtomicU32,
    /// `owed` dropped to zero, or the inbox failed.
    settled: Notify,
    /// A reply over [`LARGE_REPLY`] bytes arrived.
    large: AtomicBool,
}

/// Replies waiting in an inbox beyond which the client moves to a connection of its own, so
/// that Redis holds the replies it does not read, as it would directly (what it already
/// sent is still answered through stormwall).
pub const INBOX_PAUSE: usize = 1024 * 1024;

#[derive(Default)]
struct InboxInner {
    buf: BytesMut,
    /// The connection carrying this client's commands failed with replies owed.
    failed: bool,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxInner> {
        // Nothing panics while holding it, and the data stays consistent if it did.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the replies received so far into `buf` (waiting for some). An error once the
    /// connection failed with replies owed to this client.
    pub async fn read(&self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                let n = inner.buf.len();
                if n > 0 {
                    if buf.is_empty() {
                        // Hand the buffer over instead of copying it.
                        std::mem::swap(buf, &mut inner.buf);
                        inner.buf.clear();
                    } else {
                        buf.extend_from_slice(&inner.buf);
                        inner.buf.clear();
                    }
                    return Ok(n);
                }
                if inner.failed {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the shared Redis connection was lost with replies owed",
                    ));
                }
            }
            notified.await;
        }
    }

    /// Whether a reply over [`LARGE_REPLY`] bytes arrived for this client.
    pub fn got_large_reply(&self) -> bool {
        self.large.load(Ordering::Relaxed)
    }

    /// Bytes of replies waiting for the client to read them.
    pub fn held(&self) -> usize {
        self.lock().buf.len()
    }

    /// Replies sent for and not yet received.
    pub fn owed(&self) -> u32 {
        self.owed.load(Ordering::Acquire)
    }

    /// Whether replies were lost with a failed connection.
    pub fn failed(&self) -> bool {
        self.lock().failed
    }

    /// Waits until every reply sent for has been received (or the inbox failed): from then
    /// on Redis has executed everything this client sent.
    pub async fn settled(&self) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.owed() == 0 || self.failed() {
                return;
            }
            notified.await;
        }
    }

    fn deliver_copy(&self, bytes: &[u8], replies: u32) {
        let mut inner = self.lock();
        if inner.buf.capacity() == 0 {
            inner.buf = crate::buffers::take();
        }
        inner.buf.extend_from_slice(bytes);
        drop(inner);
        self.delivered(replies);
    }

    fn deliver(&self, bytes: BytesMut, replies: u32) {
        let mut inner = self.lock();
        if inner.buf.is_empty() {
            inner.buf = bytes;
        } else {
            inner.buf.extend_from_slice(&bytes);
        }
        drop(inner);
        self.delivered(replies);
    }

    fn delivered(&self, replies: u32) {
        self.ready.notify_one();
        if self.owed.fetch_sub(replies, Ordering::AcqRel) == replies {
            self.settled.notify_waiters();
        }
    }

    fn fail(&self) {
        self.lock().failed = true;
        self.ready.notify_one();
        self.settled.notify_waiters();
    }
}

/// Delivers the pending run, `buf[start..pos]`, split off the buffer (the bytes before it
/// are dropped: pushes and captured replies). Returns `pos` counted from the new start.
fn flush(run: &mut Option<(Arc<Inbox>, usize, u32)>, pos: usize, buf: &mut BytesMut) -> usize {
    let Some((inbox, start, replies)) = run.take() else {
        return pos;
    };
    buf.advance(start);
    let run = pos - start;
    if run < SPLIT_MIN {
        // Copied: a small piece split off would keep the whole read buffer alive for as
        // long as its client takes to read it.
        inbox.deliver_copy(&buf[..run], replies);
        buf.advance(run);
    } else {
        inbox.deliver(buf.split_to(run), replies);
    }
    0
}

/// Runs of replies at least this long are handed over without a copy.
const SPLIT_MIN: usize = 16 * 1024;

/// A reply larger than this marks its client as one that gets large replies: it moves to a
/// connection of its own, so that its next ones do not hold up other clients' replies
/// behind them on the shared connection.
pub const LARGE_REPLY: usize = 1024 * 1024;

/// Who the next replies belong to.
enum Route {
    Inbox(Arc<Inbox>, u32),
    Capture {
        want: u32,
        got: Vec<Bytes>,
        tx: oneshot::Sender<Vec<Bytes>>,
    },
}

#[derive(Default)]
struct State {
    out: BytesMut,
    /// Commands in `out`.
    queued: u32,
    routes: VecDeque<Route>,
    dead: bool,
    /// The upstream moved: close once every reply owed on it has arrived.
    retired: bool,
}

impl State {
    /// Retired with nothing owed: nobody may send on it any more (a client with nothing in
    /// flight moves to the new upstream), and it is about to close.
    fn drained(&self) -> bool {
        self.retired && self.routes.is_empty()
    }
}

/// How long a retired connection may go on carrying the replies still owed on it (a client
/// that never stops pipelining never lets them reach zero) before it is closed regardless.
const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// What [`Mux::send`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// Too much is waiting to be written: wait for [`Mux::room`].
    Full,
    Dead,
}

/// Metric handles a shared connection updates.
#[derive(Clone)]
pub struct MuxMetrics {
    /// Commands carried per write to Redis.
    pub write_commands: Histogram,
    /// Shared connections open.
    pub connections: Gauge,
    /// Connections open to one cluster master (`None` for a standalone Redis).
    pub node_connections: Option<Gauge>,
}

/// One shared Redis connection.
pub struct Mux {
    state: Mutex<State>,
    wake: Notify,
    /// The writer took the output buffer.
    written: Notify,
    stop: CancellationToken,
    /// The upstream epoch the connection was opened in ([`crate::upstream::Target`]).
    epoch: u64,
}

impl Mux {
    /// Starts carrying traffic on a connection already in the pool's state, opened in the
    /// upstream's `epoch`.
    pub(crate) fn start(
        read: ReadHalf,
        write: WriteHalf,
        metrics: MuxMetrics,
        epoch: u64,
    ) -> Arc<Mux> {
        let mux = Arc::new(Mux {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            written: Notify::new(),
            stop: CancellationToken::new(),
            epoch,
        });
        metrics.connections.increment(1.0);
        if let Some(node) = &metrics.node_connections {
            node.increment(1.0);
        }
        let writer = mux.clone();
        let hist = metrics.write_commands.clone();
        tokio::spawn(async move { writer.write_loop(write, hist).await });
        let reader = mux.clone();
        tokio::spawn(async move {
            reader.read_loop(read).await;
            metrics.connections.decrement(1.0);
            if let Some(node) = &metrics.node_connections {
                node.decrement(1.0);
            }
        });
        mux
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancelled when the connection fails or closes: Redis may have restarted.
    pub fn lost(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Whether the connection failed or was closed.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Whether the connection was retired (the upstream moved), rather than failed.
    pub fn is_retired(&self) -> bool {
        self.lock().retired
    }

    /// The upstream epoch the connection was opened in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The upstream moved: the connection closes once no reply is owed on it any more (its
    /// clients move to a new one when they have nothing in flight), or after
    /// [`RETIRE_GRACE`] at the latest.
    pub fn retire(self: &Arc<Self>) {
        {
            let mut state = self.lock();
            if state.retired || state.dead {
                return;
            }
            state.retired = true;
            if state.routes.is_empty() {
                drop(state);
                return self.close();
            }
        }
        let mux = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(RETIRE_GRACE) => mux.close(),
                _ = mux.stop.cancelled() => {}
            }
        });
    }

    /// Waits while more than [`OUT_PAUSE`] bytes wait to be written (or the connection is
    /// dead).
    pub async fn room(&self) {
        loop {
            let notified = self.written.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.lock();
                if state.out.len() <= OUT_PAUSE || state.dead {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Queues `bytes` (`replies` commands, each answered once) for `inbox`'s client, unless
    /// the connection is dead or has more than [`OUT_PAUSE`] bytes waiting (then nothing was
    /// queued: [`room`](Self::room) says when to try again).
    pub fn send(&self, inbox: &Arc<Inbox>, bytes: &[u8], replies: u32) -> Sent {
        let mut state = self.lock();
        if state.dead || state.drained() {
            return Sent::Dead;
        }
        if state.out.len() > OUT_PAUSE {
            return Sent::Full;
        }
        if replies > 0 {
            inbox.owed.fetch_add(replies, Ordering::AcqRel);
            match state.routes.back_mut() {
                Some(Route::Inbox(last, n)) if Arc::ptr_eq(last, inbox) => *n += replies,
                _ => state.routes.push_back(Route::Inbox(inbox.clone(), replies)),
            }
        }
        self.queue(state, bytes, replies);
        Sent::Queued
    }

    /// Queues `bytes` (`replies` commands) whose replies stormwall reads itself; they come
    /// back, in order, through the returned receiver (dropped if the connection fails).
    pub fn capture(&self, bytes: &[u8], replies: u32) -> Option<oneshot::Receiver<Vec<Bytes>>> {
        let mut state = self.lock();
        if state.dead || state.drained() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        state.routes.push_back(Route::Capture {
            want: replies,
            got: Vec::with_capacity(replies as usize),
            tx,
        });
        self.queue(state, bytes, replies);
        Some(rx)
    }

    fn queue(&self, mut state: MutexGuard<'_, State>, bytes: &[u8], replies: u32) {
        let was_empty = state.out.is_empty();
        state.out.extend_from_slice(bytes);
        state.queued += replies;
        drop(state);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Closes the connection (the pool no longer wants it); clients still owed replies on
    /// it are failed.
    pub fn close(&self) {
        self.fail();
    }

    /// Marks the connection dead and fails every client still owed a reply.
    fn fail(&self) {
        let routes = {
            let mut state = self.lock();
            if state.dead {
                return;
            }
            state.dead = true;
            state.out = BytesMut::new();
            std::mem::take(&mut state.routes)
        };
        self.stop.cancel();
        self.written.notify_waiters();
        for route in routes {
            if let Route::Inbox(inbox, _) = route {
                inbox.fail();
            }
            // A capture's sender is dropped: its receiver sees the failure.
        }
    }

    async fn write_loop(&self, mut write: WriteHalf, commands: Histogram) {
        let mut batch = BytesMut::new();
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let queued = {
                let mut state = self.lock();
                if state.dead {
                    break;
                }
                if state.out.is_empty() {
                    None
                } else {
                    std::mem::swap(&mut state.out, &mut batch);
                    Some(std::mem::take(&mut state.queued))
                }
            };
            self.written.notify_waiters();
            let Some(queued) = queued else {
                tokio::select! {
                    _ = notified => {}
                    _ = self.stop.cancelled() => break,
                }
                continue;
            };
            commands.record(f64::from(queued));
            let written = tokio::select! {
                r = write.send_all(&batch) => r,
                _ = self.stop.cancelled() => break,
            };
            if let Err(e) = written {
                debug!(error = %e, "shared upstream connection: write failed");
                self.fail();
                break;
            }
            batch.clear();
            if batch.capacity() > KEEP_OUT {
                batch = BytesMut::new();
            }
        }
        let _ = write.shutdown().await;
    }

    async fn read_loop(&self, mut read: ReadHalf) {
        let mut buf = BytesMut::with_capacity(READ_BUF);
        let mut scanner = ReplyScanner::new(u64::MAX);
        loop {
            if buf.capacity() - buf.len() < READ_BUF / 4 {
                buf.reserve(READ_BUF);
            }
            let n = tokio::select! {
                r = read.read_buf(&mut buf) => r,
                _ = self.stop.cancelled() => return,
            };
            match n {
                Ok(n) if n > 0 => {}
                Ok(_) => {
                    debug!("shared upstream connection closed by Redis");
                    return self.fail();
                }
                Err(e) => {
                    debug!(error = %e, "shared upstream connection: read failed");
                    return self.fail();
                }
            }
            if let Err(problem) = self.dispatch(&mut buf, &mut scanner) {
                warn!(
                    problem,
                    "shared upstream connection out of step; closing it"
                );
                return self.fail();
            }
        }
    }

    /// Hands every complete reply in `buf` to its route and consumes it. A run of replies
    /// for one client is split off the read buffer and handed over whole, not copied.
    fn dispatch(&self, buf: &mut BytesMut, scanner: &mut ReplyScanner) -> Result<(), &'static str> {
        let mut state = self.lock();
        // Offsets are from the start of `buf`, which moves as runs are split off.
        let mut pos = 0;
        // A run of consecutive replies for the same inbox: (inbox, start, replies).
        let mut run: Option<(Arc<Inbox>, usize, u32)> = None;
        loop {
            let (len, kind) = match scanner.next(&buf[pos..]) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return Err("invalid reply"),
            };
            if kind == FrameKind::Push {
                // Only clients with pub/sub or tracking get pushes, and they are private.
                pos = flush(&mut run, pos, buf);
                pos += len;
                continue;
            }
            let Some(route) = state.routes.front_mut() else {
                flush(&mut run, pos, buf);
                return Err("a reply no request is waiting for");
            };
            let done = match route {
                Route::Inbox(inbox, n) => {
                    match &mut run {
                        Some((current, _, replies)) if Arc::ptr_eq(current, inbox) => {
                            *replies += 1;
                        }
                        _ => {
                            pos = flush(&mut run, pos, buf);
                            run = Some((inbox.clone(), pos, 1));
                        }
                    }
                    if len > LARGE_REPLY {
                        inbox.large.store(true, Ordering::Relaxed);
                    }
                    *n -= 1;
                    *n == 0
                }
                Route::Capture { want, got, .. } => {
                    pos = flush(&mut run, pos, buf);
                    got.push(Bytes::copy_from_slice(&buf[pos..pos + len]));
                    got.len() == *want as usize
                }
            };
            pos += len;
            if done && let Some(Route::Capture { got, tx, .. }) = state.routes.pop_front() {
                let _ = tx.send(got);
            }
        }
        pos = flush(&mut run, pos, buf);
        let drained = state.drained();
        drop(state);
        buf.advance(pos);
        if drained {
            self.close();
        }
        Ok(())
    }
}
