//! stormwall's own command connections to Redis, used by the invalidation engine.
//!
//! Client sessions relay bytes and never decode replies; the engine, in contrast, sends its
//! own commands and must read their results (a `DEL` count, an `EXEC` array). A [`Conn`] is
//! opened *as* a client identity — the same user, password and database the client's own
//! connection had — so the engine can never do what the client could not (G5).

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::UpstreamConfig;
use crate::net::{ReadHalf, Stream, WriteHalf};

/// Who a connection acts as: the credentials and database a client session established.
/// Invalidations are grouped by it, and executed on connections opened with it.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Identity {
    /// `None`: never authenticated (the default user, if Redis allows that without a password).
    pub user: Option<Bytes>,
    pub password: Option<Bytes>,
    pub db: i64,
}

/// Never prints the password: identities end up in logs and panic messages.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .finish()
    }
}

/// Why a connection could not be used.
#[derive(Debug)]
pub enum ConnError {
    /// Connecting, writing or reading failed (transient: worth retrying).
    Io(io::Error),
    /// Redis refused to let this connection act as the identity (`AUTH`/`SELECT` refused, or
    /// `NOAUTH`) with this error: retrying won't help.
    Refused(String),
}

/// A connection that sends commands and decodes their replies.
pub struct Conn {
    read: ReadHalf,
    write: WriteHalf,
    buf: BytesMut,
    reply_timeout: Duration,
}

impl Conn {
    /// Connects, without any handshake.
    pub async fn connect(cfg: &UpstreamConfig) -> io::Result<Conn> {
        let stream = Stream::connect(&cfg.address, cfg.connect_timeout, cfg.tcp_keepalive).await?;
        let (read, write) = stream.into_split();
        Ok(Conn {
            read,
            write,
            buf: BytesMut::with_capacity(4096),
            reply_timeout: if cfg.reply_timeout.is_zero() {
                Duration::from_secs(3600)
            } else {
                cfg.reply_timeout
            },
        })
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
        let mut handshake: Vec<Vec<Bytes>> = Vec::new();
        if let Some(password) = &who.password {
            let mut auth = vec![Bytes::from_static(b"AUTH")];
            auth.extend(who.user.clone());
            auth.push(password.clone());
            handshake.push(auth);
        }
        if who.db != 0 {
            handshake.push(vec![
                Bytes::from_static(b"SELECT"),
                Bytes::from(who.db.to_string()),
            ]);
        }
        handshake.push(vec![Bytes::from_static(b"PING")]);
        let replies = conn
            .call_until(&handshake, deadline)
            .await
            .map_err(ConnError::Io)?;
        let ping = handshake.len() - 1;
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

    /// Whether Redis has closed this idle connection (a `CLIENT KILL`, its `timeout`, a
    /// restart), asked of the kernel without waiting: a peek finds the end of the stream, an
    /// error, or bytes nobody asked for (out of step: unusable too). The kernel is asked
    /// directly, not the runtime's readiness cache, which may not have seen a close that
    /// happened a moment ago.
    pub fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let socket = match &self.read {
            ReadHalf::Tcp(r) => SockRef::from(r.as_ref()),
            ReadHalf::Unix(r) => SockRef::from(r.as_ref()),
        };
        let mut spare = [MaybeUninit::<u8>::uninit(); 1];
        match socket.peek(&mut spare) {
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            Ok(_) => true,
        }
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

    async fn call(&mut self, commands: &[Vec<Bytes>]) -> io::Result<Vec<OwnedFrame>> {
        let mut out = Vec::new();
        for args in commands {
            crate::resp::encode_command(&mut out, args);
        }
        self.write.write_all(&out).await?;
        let mut replies = Vec::with_capacity(commands.len());
        while replies.len() < commands.len() {
            match decode(&self.buf) {
                Ok(Some((frame, len))) => {
                    self.buf.advance(len);
                    replies.push(frame);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let who = Identity {
            user: Some(Bytes::from_static(b"alice")),
            password: Some(Bytes::from_static(b"hunter2")),
            db: 3,
        };
        let shown = format!("{who:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("alice") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}

/// Checks that Redis answers, over one long-lived connection: `PING`, where any reply — even
/// `-NOAUTH` — proves a live Redis, so the probe needs no credentials. It also finds out
/// whether Redis requires new connections to authenticate (a fresh connection's `PING` gets
/// `-NOAUTH`), since the long-lived one keeps the authentication Redis granted it when it
/// connected; that costs one short connection every [`AUTH_CHECK_INTERVAL`].
#[derive(Default)]
pub struct Probe {
    conn: Option<Conn>,
    /// When Redis's need for authentication was last checked, and what it was.
    auth_checked: Option<(Instant, bool)>,
}

/// How often the probe checks whether Redis requires authentication.
const AUTH_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl Probe {
    /// Whether Redis answers, and if so whether it requires new connections to authenticate.
    pub async fn check(&mut self, cfg: &UpstreamConfig) -> io::Result<bool> {
        // Redis closing the probe's connection (its `timeout`, a `CLIENT KILL`, even in the
        // middle of a PING) says nothing about whether it answers: such a connection is
        // replaced quietly, and only a fresh connection's failure counts.
        if self.conn.as_mut().is_some_and(Conn::is_closed) {
            self.conn = None;
        }
        let reused = self.conn.is_some();
        let fresh = match self.ping(cfg).await {
            Err(_) if reused => self.ping(cfg).await?,
            result => result?,
        };
        match self.auth_checked {
            Some((at, required)) if at.elapsed() < AUTH_CHECK_INTERVAL => Ok(required),
            _ => {
                let required = match fresh {
                    Some(required) => required,
                    None => {
                        let mut conn = Conn::connect(cfg).await?;
                        ping_needs_auth(&mut conn, cfg).await?
                    }
                };
                self.auth_checked = Some((Instant::now(), required));
                Ok(required)
            }
        }
    }

    /// PINGs over the long-lived connection. `Some(needs_auth)` when that connection was
    /// opened just now (so its answer also says whether Redis requires authentication).
    async fn ping(&mut self, cfg: &UpstreamConfig) -> io::Result<Option<bool>> {
        let (conn, fresh) = match self.conn.as_mut() {
            Some(conn) => (conn, false),
            None => (self.conn.insert(Conn::connect(cfg).await?), true),
        };
        let result = ping_needs_auth(conn, cfg).await;
        if result.is_err() {
            self.conn = None;
        }
        result.map(|needs| fresh.then_some(needs))
    }
}

/// PINGs and says whether Redis refused for lack of authentication.
async fn ping_needs_auth(conn: &mut Conn, cfg: &UpstreamConfig) -> io::Result<bool> {
    let ping = [vec![Bytes::from_static(b"PING")]];
    let deadline = Instant::now() + cfg.connect_timeout;
    let replies = conn.call_until(&ping, deadline).await?;
    Ok(matches!(replies.first(), Some(OwnedFrame::Error(e)) if e.starts_with("NOAUTH")))
}
