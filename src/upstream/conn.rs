//! A connection that sends stormwall's own commands and decodes their replies.
//!
//! Client sessions relay bytes and never decode replies; the engine, in contrast, sends its
//! own commands and must read their results (a `DEL` count, an `EXEC` array). A [`Conn`] is
//! opened *as* a client identity — the same user, password and database the client's own
//! connection had — so the engine can never do what the client could not (G5).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::sentinel::{Role, not_master, role};
use super::{ConnError, Identity, Target};
use crate::config::{UpstreamConfig, UpstreamKind};
use crate::net::{Addr, ReadHalf, Stream, WriteHalf};
use crate::resp::reply::{FrameKind, ReplyScanner};

/// A connection that sends commands and decodes their replies.
pub struct Conn {
    read: ReadHalf,
    write: WriteHalf,
    buf: BytesMut,
    reply_timeout: Duration,
    /// The upstream target and its epoch when this connection was opened (`None`: not a
    /// connection to the upstream, e.g. to a Sentinel).
    opened_in: Option<(Arc<Target>, u64)>,
}

impl Conn {
    /// Connects to where Redis is now, without any handshake.
    pub async fn connect(cfg: &UpstreamConfig) -> io::Result<Conn> {
        let (stream, epoch) = Stream::connect_upstream(cfg).await?;
        Ok(Conn::over(stream, cfg, Some((cfg.target.clone(), epoch))))
    }

    /// Connects to `address` (a Sentinel, or a server being checked), without any handshake.
    pub async fn connect_to(address: &Addr, cfg: &UpstreamConfig) -> io::Result<Conn> {
        let tls = cfg.tls.loaded.clone();
        let stream = Stream::connect_to(address, &tls, cfg).await?;
        Ok(Conn::over(stream, cfg, None))
    }

    fn over(stream: Stream, cfg: &UpstreamConfig, opened_in: Option<(Arc<Target>, u64)>) -> Conn {
        let (read, write) = stream.into_split();
        Conn {
            read,
            write,
            buf: BytesMut::with_capacity(4096),
            reply_timeout: cfg.reply_wait(),
            opened_in,
        }
    }

    /// The upstream epoch this connection was opened in.
    pub fn epoch(&self) -> u64 {
        self.opened_in.as_ref().map_or(0, |(_, epoch)| *epoch)
    }

    /// Connects and authenticates as `who`, selects its database, and checks with a `PING`
    /// that Redis answers and accepts this identity, all before `deadline`. So a connection
    /// this returns is one a batch can be sent on: a Redis that is stalled, or that no longer
    /// accepts the identity's credentials, is found out before anything is sent.
    pub async fn open(
        cfg: &UpstreamConfig,
        who: &Identity,
        deadline: Instant,
    ) -> Result<Conn, ConnError> {
        let mut conn = tokio::time::timeout_at(deadline, Conn::connect(cfg))
            .await
            .map_err(|_| ConnError::Io(io::ErrorKind::TimedOut.into()))?
            .map_err(ConnError::Io)?;
        let mut handshake = who.commands();
        handshake.push(vec![Bytes::from_static(b"PING")]);
        let ping = handshake.len() - 1;
        let sentinel = cfg.kind == UpstreamKind::Sentinel;
        if sentinel {
            handshake.push(vec![Bytes::from_static(b"ROLE")]);
        }
        let mut replies = conn
            .call_until(&handshake, deadline)
            .await
            .map_err(ConnError::Io)?;
        if sentinel && let Some(reply) = replies.pop() {
            // Writes only go to a server that says it is the master (a failover may have
            // made it a replica since Sentinel named it).
            if let Role::Other(role) = role(&reply) {
                return Err(ConnError::Io(not_master(&role)));
            }
        }
        for (i, reply) in replies.into_iter().enumerate() {
            match reply {
                // A user without `+ping` gets NOPERM and is fine; any other error to the
                // handshake (NOAUTH, WRONGPASS, `max number of clients reached` — Redis then
                // closes the connection —, LOADING) means this connection cannot serve.
                OwnedFrame::Error(e) if i < ping || !e.starts_with("NOPERM") => {
                    return Err(ConnError::Refused(e));
                }
                _ => {}
            }
        }
        Ok(conn)
    }

    /// Puts this connection into a client's state by running `commands` (an `AUTH`, a
    /// `SELECT`, a `HELLO`, …); fails if Redis refuses any of them.
    pub async fn establish(
        &mut self,
        commands: &[Vec<Bytes>],
        deadline: Instant,
    ) -> Result<(), ConnError> {
        if commands.is_empty() {
            return Ok(());
        }
        let replies = self
            .call_raw_until(commands, deadline)
            .await
            .map_err(ConnError::Io)?;
        match replies.iter().find(|r| r.first() == Some(&b'-')) {
            Some(refused) => Err(ConnError::Refused(
                String::from_utf8_lossy(&refused[1..]).trim_end().to_owned(),
            )),
            None => Ok(()),
        }
    }

    /// Whether Redis has closed this idle connection (a `CLIENT KILL`, its `timeout`, a
    /// restart), asked of the kernel without waiting: a peek finds the end of the stream, an
    /// error, or bytes nobody asked for (out of step: unusable too). The kernel is asked
    /// directly, not the runtime's readiness cache, which may not have seen a close that
    /// happened a moment ago.
    pub fn is_closed(&mut self) -> bool {
        !self.buf.is_empty() || self.is_stale() || self.read.is_closed()
    }

    /// Whether the upstream moved since this connection was opened (a reload changed the
    /// address, Sentinel named another master): it goes to a Redis that is no longer the
    /// upstream, and counts as closed.
    fn is_stale(&self) -> bool {
        self.opened_in
            .as_ref()
            .is_some_and(|(target, epoch)| !target.is_current(*epoch))
    }

    /// Sends `commands` as one pipeline and returns their replies in order, giving up at
    /// `deadline` (or after `upstream.reply_timeout`, if sooner).
    pub async fn call_until(
        &mut self,
        commands: &[Vec<Bytes>],
        deadline: Instant,
    ) -> io::Result<Vec<OwnedFrame>> {
        let limit = deadline.min(Instant::now() + self.reply_timeout);
        tokio::time::timeout_at(limit, self.call(commands))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "Redis did not reply in time"))?
    }

    /// Waits for one more reply without sending anything: a message on a subscribed
    /// connection. Cancel-safe: bytes read so far stay for the next call.
    pub async fn receive(&mut self) -> io::Result<OwnedFrame> {
        let raw = self.exchange(b"", 1).await?;
        decoded(&raw)?
            .pop()
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }

    async fn call(&mut self, commands: &[Vec<Bytes>]) -> io::Result<Vec<OwnedFrame>> {
        decoded(&self.call_raw(commands).await?)
    }

    /// Sends `commands` as one pipeline (each an argument list) and returns their replies
    /// as Redis sent them, RESP2 or RESP3, before `deadline`.
    pub async fn call_raw_until(
        &mut self,
        commands: &[Vec<Bytes>],
        deadline: Instant,
    ) -> io::Result<Vec<Bytes>> {
        let mut out = Vec::new();
        for args in commands {
            crate::resp::encode_command(&mut out, args);
        }
        self.exchange_until(&out, commands.len(), deadline).await
    }

    /// Writes `request` (already encoded, `replies` commands) and returns the replies.
    pub async fn exchange_until(
        &mut self,
        request: &[u8],
        replies: usize,
        deadline: Instant,
    ) -> io::Result<Vec<Bytes>> {
        let limit = deadline.min(Instant::now() + self.reply_timeout);
        tokio::time::timeout_at(limit, self.exchange(request, replies))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "Redis did not reply in time"))?
    }

    async fn call_raw(&mut self, commands: &[Vec<Bytes>]) -> io::Result<Vec<Bytes>> {
        let mut out = Vec::new();
        for args in commands {
            crate::resp::encode_command(&mut out, args);
        }
        self.exchange(&out, commands.len()).await
    }

    async fn exchange(&mut self, request: &[u8], count: usize) -> io::Result<Vec<Bytes>> {
        self.write.send_all(request).await?;
        let mut scanner = ReplyScanner::new(u64::MAX);
        let mut replies = Vec::with_capacity(count);
        while replies.len() < count {
            match scanner.next(&self.buf) {
                Ok(Some((len, FrameKind::Reply))) => {
                    replies.push(self.buf.split_to(len).freeze());
                    continue;
                }
                // Pushes answer nothing (none are expected on these connections).
                Ok(Some((len, FrameKind::Push))) => {
                    self.buf.advance(len);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("invalid reply from Redis: {e}"),
                    ));
                }
            }
            if self.read.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(replies)
    }

    /// The socket halves, for a connection that goes on carrying client traffic; `None` if
    /// Redis sent bytes nobody asked for (out of step).
    pub(crate) fn into_halves(self) -> Option<(ReadHalf, WriteHalf)> {
        self.buf.is_empty().then_some((self.read, self.write))
    }
}

/// Decodes replies read whole.
fn decoded(raw: &[Bytes]) -> io::Result<Vec<OwnedFrame>> {
    raw.iter()
        .map(|frame| match decode(frame) {
            Ok(Some((frame, _))) => Ok(frame),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "invalid reply from Redis (RESP3 where RESP2 was expected?)",
            )),
        })
        .collect()
}
