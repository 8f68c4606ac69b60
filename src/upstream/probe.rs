//! The readiness probe's view of Redis.

use std::io;

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::time::Instant;

use super::Conn;
use crate::config::UpstreamConfig;

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
    /// The last `PING`'s round trip on the long-lived connection, connecting excluded.
    round_trip: Option<std::time::Duration>,
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
        let started = Instant::now();
        let result = ping_needs_auth(conn, cfg).await;
        self.round_trip = result.is_ok().then(|| started.elapsed());
        if result.is_err() {
            self.conn = None;
        }
        result.map(|needs| fresh.then_some(needs))
    }

    /// The round trip of the last check's `PING`, without the time spent connecting (a TCP
    /// or TLS handshake to a distant Redis, or the authentication check's short connection,
    /// is no sign of Redis being busy). `None` if the last check failed.
    pub fn round_trip(&self) -> Option<std::time::Duration> {
        self.round_trip
    }
}

/// PINGs and says whether Redis refused for lack of authentication.
async fn ping_needs_auth(conn: &mut Conn, cfg: &UpstreamConfig) -> io::Result<bool> {
    let ping = [vec![Bytes::from_static(b"PING")]];
    let deadline = Instant::now() + cfg.connect_timeout;
    let replies = conn.call_until(&ping, deadline).await?;
    Ok(matches!(replies.first(), Some(OwnedFrame::Error(e)) if e.starts_with("NOAUTH")))
}
