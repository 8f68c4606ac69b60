//! Addresses and byte streams that are TCP, unix sockets, or TLS over TCP.
//!
//! Clients may reach stormwall over any of them, and stormwall may reach Redis over any; the
//! session code is written once against these enums instead of being generic six ways.
//! Every connection stormwall opens to Redis goes through [`Stream::connect_upstream`], so
//! `[upstream.tls]` applies to all of them (shared, spare, pinned, dedicated, the shield's,
//! the probe's, the latency sampler's).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream, tcp, unix};

use crate::config::UpstreamConfig;

/// `host:port` (TCP) or a filesystem path (unix socket). A path is anything containing `/`,
/// optionally written `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for Addr {
    type Err = String;

    fn from_str(s: &str) -> Result<Addr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(path.into()));
        }
        if s.contains('/') {
            return Ok(Addr::Unix(s.into()));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Addr::Tcp(s.to_owned()))
            }
            _ => Err(format!(
                "`{s}` is neither host:port nor a unix socket path (a path must contain `/`)"
            )),
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(hp) => f.write_str(hp),
            // Written so that it parses back as a path: one without a `/` (or one that
            // itself starts with `unix:`) needs the prefix (found by the config fuzzer).
            Addr::Unix(p) => {
                let path = p.display().to_string();
                if path.contains('/') && !path.starts_with("unix:") {
                    f.write_str(&path)
                } else {
                    write!(f, "unix:{path}")
                }
            }
        }
    }
}

impl Serialize for Addr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Addr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Applies the socket options every proxied TCP connection wants: no Nagle delay (pipelined
/// replies must not wait for an ACK) and keepalive so dead peers are noticed.
fn tune_tcp(stream: &TcpStream, keepalive: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    if !keepalive.is_zero() {
        let ka = socket2::TcpKeepalive::new()
            .with_time(keepalive)
            .with_interval(keepalive.min(Duration::from_secs(75)));
        socket2::SockRef::from(stream).set_tcp_keepalive(&ka)?;
    }
    Ok(())
}

/// A connected byte stream.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream<TcpStream>>),
}

type TlsStream<S> = tokio_rustls::TlsStream<S>;

impl Stream {
    /// Opens a connection to Redis as `[upstream]` says, to where Redis is now
    /// (`upstream.target`): TCP or unix socket, and TLS if `upstream.tls.enabled` (connect
    /// and handshake within `upstream.connect_timeout`). Also returns the target's epoch the
    /// connection was opened in.
    pub(crate) async fn connect_upstream(cfg: &UpstreamConfig) -> io::Result<(Stream, u64)> {
        let at = cfg.target.locate(cfg)?;
        let stream = Stream::connect_to(&at.address, &at.tls, cfg).await?;
        Ok((stream, at.epoch))
    }

    /// Opens a connection to `address` (Redis, or a Sentinel) with `[upstream]`'s timeouts,
    /// and TLS with `tls` if `upstream.tls.enabled`.
    pub(crate) async fn connect_to(
        address: &Addr,
        tls: &crate::tls::Loaded<crate::tls::ClientSide>,
        cfg: &UpstreamConfig,
    ) -> io::Result<Stream> {
        let stream = Stream::connect(address, cfg.connect_timeout, cfg.tcp_keepalive);
        if !cfg.tls.enabled {
            return stream.await;
        }
        let Some(tls) = tls.get() else {
            return Err(io::Error::other(
                "upstream.tls is enabled but its certificates were not loaded",
            ));
        };
        let connect = async {
            let Stream::Tcp(tcp) = stream.await? else {
                return Err(io::Error::other("upstream TLS needs a TCP address"));
            };
            let handshake = tls.connector.connect(tls.server_name.clone(), tcp).await;
            let result = handshake.as_ref().map(|_| ()).map_err(copy_error);
            crate::tls::note_handshake("upstream", &address.to_string(), &result);
            Ok(Stream::Tls(Box::new(handshake?.into())))
        };
        tokio::time::timeout(cfg.connect_timeout, connect)
            .await
            .unwrap_or_else(|_| {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "TLS handshake with Redis timed out after {}",
                        humantime::format_duration(cfg.connect_timeout)
                    ),
                );
                crate::tls::note_handshake("upstream", &address.to_string(), &Err(copy_error(&e)));
                Err(e)
            })
    }

    /// Runs the server side of a TLS handshake on an accepted client connection.
    pub(crate) async fn accept_tls(
        self,
        acceptor: &tokio_rustls::TlsAcceptor,
    ) -> io::Result<Stream> {
        match self {
            Stream::Tcp(tcp) => Ok(Stream::Tls(Box::new(acceptor.accept(tcp).await?.into()))),
            _ => Err(io::Error::other("TLS is only offered on TCP listeners")),
        }
    }

    /// Connects to `addr`, giving up after `timeout`.
    async fn connect(addr: &Addr, timeout: Duration, keepalive: Duration) -> io::Result<Stream> {
        let connect = async {
            match addr {
                Addr::Tcp(hp) => {
                    let s = TcpStream::connect(hp.as_str()).await?;
                    tune_tcp(&s, keepalive)?;
                    Ok(Stream::Tcp(s))
                }
                Addr::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p).await?)),
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connect timed out after {}",
                        humantime::format_duration(timeout)
                    ),
                ))
            })
    }

    pub(crate) fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

/// An error's kind and text, with the TLS error inside it kept (for its reason label).
fn copy_error(e: &io::Error) -> io::Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => io::Error::new(e.kind(), tls.clone()),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

pub(crate) enum ReadHalf {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

pub(crate) enum WriteHalf {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

impl ReadHalf {
    /// Reads into `buf` (which `fill` provides just before the read), waiting for data.
    ///
    /// On TCP and unix sockets the wait is for readiness, with no buffer held: an idle
    /// client costs no buffer. A TLS record must be decrypted into a buffer as it is read,
    /// so there the buffer is provided first (rustls keeps its own per-connection buffers
    /// in any case).
    pub(crate) async fn read_some(
        &mut self,
        buf: &mut bytes::BytesMut,
        fill: impl Fn(&mut bytes::BytesMut),
    ) -> io::Result<usize> {
        use tokio::io::AsyncReadExt;
        loop {
            match self {
                ReadHalf::Tcp(s) => s.readable().await?,
                ReadHalf::Unix(s) => s.readable().await?,
                ReadHalf::Tls(s) => {
                    fill(buf);
                    return s.read_buf(buf).await;
                }
            }
            fill(buf);
            let result = match self {
                ReadHalf::Tcp(s) => s.try_read_buf(buf),
                ReadHalf::Unix(s) => s.try_read_buf(buf),
                ReadHalf::Tls(_) => continue,
            };
            match result {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                result => return result,
            }
        }
    }

    /// Whether the peer has closed this idle connection (or sent bytes nobody asked for,
    /// which makes it unusable too), asked without waiting.
    pub(crate) fn is_closed(&mut self) -> bool {
        use std::mem::MaybeUninit;
        if let ReadHalf::Tls(r) = self {
            // A peek at the socket would see TLS records that carry no data (session
            // tickets, key updates): ask rustls instead, without a waker.
            let mut spare = [0u8; 1];
            let mut buf = ReadBuf::new(&mut spare);
            let mut cx = Context::from_waker(std::task::Waker::noop());
            return Pin::new(r).poll_read(&mut cx, &mut buf).is_ready();
        }
        let socket = match &*self {
            ReadHalf::Tcp(r) => socket2::SockRef::from(r.as_ref()),
            ReadHalf::Unix(r) => socket2::SockRef::from(r.as_ref()),
            ReadHalf::Tls(_) => return true,
        };
        // The kernel is asked directly, not the runtime's readiness cache, which may not
        // have seen a close that happened a moment ago.
        let mut spare = [MaybeUninit::<u8>::uninit(); 1];
        match socket.peek(&mut spare) {
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            Ok(_) => true,
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Unix(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl WriteHalf {
    /// Writes all of `bytes` and makes sure they have left the process. On TCP and unix
    /// sockets that is `write_all`; a TLS stream may keep encrypted records it could not
    /// write at once (a full socket buffer), which only a flush sends: without it, a reply
    /// could sit in the buffer until the next one.
    pub(crate) async fn send_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.write_all(bytes).await?;
        if let WriteHalf::Tls(w) = self {
            w.flush().await?;
        }
        Ok(())
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Unix(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Unix(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Unix(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            WriteHalf::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            WriteHalf::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// A bound listening socket.
pub enum Listener {
    Tcp(TcpListener, Duration),
    /// The TLS listener (`listen.tls.address`): accepts TCP; the handshake is the session's.
    Tls(TcpListener, Duration),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A stale unix socket file left by a previous run is replaced, as Redis does.
    pub(crate) async fn bind(addr: &Addr, keepalive: Duration, tls: bool) -> io::Result<Listener> {
        match addr {
            Addr::Tcp(hp) if tls => Ok(Listener::Tls(
                TcpListener::bind(hp.as_str()).await?,
                keepalive,
            )),
            Addr::Tcp(hp) => Ok(Listener::Tcp(
                TcpListener::bind(hp.as_str()).await?,
                keepalive,
            )),
            Addr::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(meta) = std::fs::symlink_metadata(path)
                    && meta.file_type().is_socket()
                {
                    std::fs::remove_file(path)?;
                }
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
        }
    }

    /// The address actually bound (useful when the configured port was 0).
    pub(crate) fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l, _) | Listener::Tls(l, _) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("<unknown: {e}>")),
            Listener::Unix(_, path) => path.display().to_string(),
        }
    }

    /// Accepts one connection and returns it with a printable peer name.
    pub(crate) async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l, keepalive) | Listener::Tls(l, keepalive) => {
                let (s, peer) = l.accept().await?;
                // A socket option failing on one client is not worth refusing the client over.
                if let Err(e) = tune_tcp(&s, *keepalive) {
                    tracing::debug!(%peer, error = %e, "cannot set client socket options");
                }
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            Listener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), format!("unix:{}", path.display())))
            }
        }
    }
}

impl Listener {
    /// Whether clients of this listener speak TLS.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Listener::Tls(..))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_print_as_they_parse() {
        // `--check-config` prints the config; it must load back the same.
        for text in [
            "127.0.0.1:6379",
            "/run/redis.sock",
            "unix:redis.sock",
            "unix:unix:x",
        ] {
            let addr: Addr = text.parse().unwrap();
            assert_eq!(addr.to_string().parse::<Addr>().unwrap(), addr, "{text}");
        }
    }

    #[test]
    fn addr_parsing() {
        assert_eq!(
            "127.0.0.1:6379".parse(),
            Ok(Addr::Tcp("127.0.0.1:6379".into()))
        );
        assert_eq!("redis:6379".parse(), Ok(Addr::Tcp("redis:6379".into())));
        assert_eq!("[::1]:6379".parse(), Ok(Addr::Tcp("[::1]:6379".into())));
        assert_eq!(
            "/run/redis.sock".parse(),
            Ok(Addr::Unix("/run/redis.sock".into()))
        );
        assert_eq!(
            "unix:redis.sock".parse(),
            Ok(Addr::Unix("redis.sock".into()))
        );
        assert!("localhost".parse::<Addr>().is_err());
        assert!("host:notaport".parse::<Addr>().is_err());
        assert!(":6379".parse::<Addr>().is_err());
    }
}
