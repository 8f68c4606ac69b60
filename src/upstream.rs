//! stormwall's own command connections to Redis, used by the invalidation engine.
//!
//! Client sessions relay bytes and never decode replies; the engine, in contrast, sends its
//! own commands and must read their results (a `DEL` count, an `EXEC` array). A [`Conn`] is
//! opened *as* a client identity — the same user, password and database the client's own
//! connection had — so the engine can never do what the client could not (G5).

use std::io;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::UpstreamConfig;
use crate::net::{ReadHalf, Stream, WriteHalf};

/// Who a connection acts as: the credentials and database a client session established.
/// Invalidations are grouped by it, and executed on connections opened with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Identity {
    /// `None`: never authenticated (the default user, if Redis allows that without a password).
    pub user: Option<Bytes>,
    pub password: Option<Bytes>,
    pub db: i64,
}

/// Why a connection could not be used.
#[derive(Debug)]
pub enum ConnError {
    /// Connecting, writing or reading failed (transient: worth retrying).
    Io(io::Error),
    /// Redis refused the handshake (`AUTH`/`SELECT`) with this error: retrying won't help.
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
    /// Connects and authenticates as `who`, then selects its database.
    pub async fn open(cfg: &UpstreamConfig, who: &Identity) -> Result<Conn, ConnError> {
        let stream = Stream::connect(&cfg.address, cfg.connect_timeout, cfg.tcp_keepalive)
            .await
            .map_err(ConnError::Io)?;
        let (read, write) = stream.into_split();
        let mut conn = Conn {
            read,
            write,
            buf: BytesMut::with_capacity(4096),
            reply_timeout: if cfg.reply_timeout.is_zero() {
                Duration::from_secs(3600)
            } else {
                cfg.reply_timeout
            },
        };
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
        if !handshake.is_empty() {
            for reply in conn.call(&handshake).await.map_err(ConnError::Io)? {
                if let OwnedFrame::Error(e) = reply {
                    return Err(ConnError::Refused(e));
                }
            }
        }
        Ok(conn)
    }

    /// Sends `commands` as one pipeline and returns their replies in order.
    pub async fn call(&mut self, commands: &[Vec<Bytes>]) -> io::Result<Vec<OwnedFrame>> {
        let mut out = BytesMut::new();
        for args in commands {
            encode_command(&mut out, args);
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
            let read = tokio::time::timeout(self.reply_timeout, self.read.read_buf(&mut self.buf))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "Redis did not reply in time")
                })?;
            if read? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(replies)
    }
}

/// Appends a command as a RESP array of bulk strings.
fn encode_command(out: &mut BytesMut, args: &[Bytes]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Checks that Redis answers, over one long-lived connection: `PING`, where any reply — even
/// `-NOAUTH` — proves a live Redis, so the probe needs no credentials.
#[derive(Default)]
pub struct Probe {
    conn: Option<Conn>,
}

impl Probe {
    pub async fn check(&mut self, cfg: &UpstreamConfig) -> io::Result<()> {
        if self.conn.is_none() {
            self.conn = Some(
                Conn::open(cfg, &Identity::default())
                    .await
                    .map_err(|e| match e {
                        ConnError::Io(e) => e,
                        ConnError::Refused(e) => io::Error::other(e),
                    })?,
            );
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let ping = [vec![Bytes::from_static(b"PING")]];
        let result = tokio::time::timeout(cfg.connect_timeout, conn.call(&ping)).await;
        match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(io::Error::new(io::ErrorKind::TimedOut, "no reply to PING"))
            }
        }
    }
}
