//! A worker's own connection to Redis: opened lazily as the worker's identity, checked for a
//! close by Redis right before each use, and replaced — so what Redis did to an idle
//! connection (`CLIENT KILL`, its `timeout`, a restart) never becomes a client's error.
//!
//! The line that matters is *sent or not*. Until a batch's bytes are written, a failure
//! only means "not yet": the worker drops requests whose clients left, reconnects and plans
//! again. Once written, a lost connection leaves the batch's fate unknown, and only the
//! caller knows whether a retry would still give exact answers (a flush: yes; a count: no).

use std::time::Duration;

use bytes::Bytes;
use metrics::{counter, gauge};
use redis_protocol::resp2::types::OwnedFrame;
use tokio::time::Instant;
use tracing::debug;

use crate::config::UpstreamConfig;
use crate::upstream::{Conn, ConnError, Identity};

/// Why nothing was sent.
#[derive(Debug)]
pub(super) enum NotSent {
    /// Redis could not be reached (or answered nothing) before the deadline.
    Unreachable,
    /// Redis does not accept this identity on a new connection, with this error.
    Refused(String),
    /// The connection turned out closed right before sending: reconnect and plan again.
    Closed,
}

/// The batch was written and its replies did not all arrive: it may or may not have been
/// applied.
#[derive(Debug)]
pub(super) struct Lost;

/// A connection counted in `stormwall_shield_upstream_connections` for as long as it lives.
struct Counted(Conn);

impl Counted {
    fn new(conn: Conn) -> Counted {
        gauge!("stormwall_shield_upstream_connections").increment(1.0);
        Counted(conn)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        gauge!("stormwall_shield_upstream_connections").decrement(1.0);
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// After Redis refused the identity, requests pass through without asking again for this
/// long: a storm from a client whose password changed must not become a storm of failing
/// `AUTH`s on new connections.
const REFUSAL_HOLD: Duration = Duration::from_secs(1);

pub(super) struct Executor {
    who: Identity,
    conn: Option<Counted>,
    backoff: Duration,
    /// When Redis last refused the identity, and its error.
    refused: Option<(Instant, String)>,
}

impl Executor {
    pub fn new(who: Identity) -> Executor {
        Executor {
            who,
            conn: None,
            backoff: FIRST_BACKOFF,
            refused: None,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.who
    }

    /// Makes sure a live connection is at hand: keeps the current one unless Redis closed
    /// it, else opens one (one attempt, until `deadline`).
    pub async fn ready(
        &mut self,
        upstream: &UpstreamConfig,
        deadline: Instant,
    ) -> Result<&mut Conn, NotSent> {
        if self.conn.as_mut().is_some_and(|c| c.0.is_closed()) {
            debug!("shield connection closed by Redis while idle; reconnecting");
            self.conn = None;
        }
        if self.conn.is_none() {
            if let Some((at, e)) = &self.refused
                && at.elapsed() < REFUSAL_HOLD
            {
                return Err(NotSent::Refused(e.clone()));
            }
            match Conn::open(upstream, &self.who, deadline).await {
                Ok(conn) => {
                    self.refused = None;
                    self.backoff = FIRST_BACKOFF;
                    self.conn = Some(Counted::new(conn));
                }
                Err(ConnError::Refused(e)) => {
                    self.refused = Some((Instant::now(), e.clone()));
                    return Err(NotSent::Refused(e));
                }
                Err(ConnError::Io(e)) => {
                    debug!(error = %e, "shield connection failed");
                    return Err(NotSent::Unreachable);
                }
            }
        }
        match self.conn.as_mut() {
            Some(c) => Ok(&mut c.0),
            None => Err(NotSent::Unreachable),
        }
    }

    /// Waits before the next attempt after Redis was unreachable. False if `deadline`
    /// would pass first.
    pub async fn pause(&mut self, deadline: Instant) -> bool {
        if Instant::now() + self.backoff > deadline {
            return false;
        }
        counter!("stormwall_invalidation_retries_total").increment(1);
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        true
    }

    /// Sends `commands` as one pipeline on the connection [`ready`](Self::ready) provided,
    /// checking once more, right before writing, that Redis has not closed it.
    pub async fn send(
        &mut self,
        commands: &[Vec<Bytes>],
        deadline: Instant,
    ) -> Result<Result<Vec<OwnedFrame>, Lost>, NotSent> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(NotSent::Closed);
        };
        if conn.0.is_closed() {
            self.conn = None;
            return Err(NotSent::Closed);
        }
        match conn.0.call_until(commands, deadline).await {
            Ok(replies) => Ok(Ok(replies)),
            Err(e) => {
                debug!(error = %e, "shield connection lost with a batch in flight");
                self.conn = None;
                Ok(Err(Lost))
            }
        }
    }

    /// Forgets the connection (its replies are out of step with what was asked).
    pub fn discard(&mut self) {
        self.conn = None;
    }
}
