//! Runs a worker's commands on its identity's connection, reconnecting and retrying
//! transient failures until the batch's deadline.
//!
//! Invalidations are idempotent, so a retry can never delete something the client did not
//! ask to delete; what a retry *can* lose is certainty about counts (the first attempt may
//! already have removed the keys). The outcome records that, so callers never present a
//! guess as a result.

use std::time::Duration;

use bytes::Bytes;
use metrics::counter;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::resp::error_reply;

use super::Shared;
use crate::upstream::{Conn, ConnError, Identity};

/// Why a batch could not be executed.
pub(super) enum Failure {
    /// Redis refused the connection's handshake (`AUTH`/`SELECT`) with this error.
    Refused(String),
    /// Redis could not be reached before the deadline. `maybe_applied`: an attempt was sent
    /// and its outcome is unknown.
    Unreachable { maybe_applied: bool },
}

impl Failure {
    /// The reply every request of a batch gets when the batch could not be executed.
    pub fn reply(&self, who: &Identity) -> Bytes {
        let maybe_applied = match self {
            Failure::Refused(e) => return error_reply(e),
            Failure::Unreachable { maybe_applied } => *maybe_applied,
        };
        warn!(
            db = who.db,
            maybe_applied, "invalidation batch failed: Redis unreachable"
        );
        counter!("stormwall_invalidation_rejected_total", "reason" => "upstream").increment(1);
        error_reply(if maybe_applied {
            "ERR stormwall: the connection to Redis was lost during the invalidation; it may or \
             may not have been applied"
        } else {
            "TRYAGAIN stormwall: Redis is unreachable; the invalidation was not applied"
        })
    }
}

pub(super) struct Outcome {
    pub replies: Vec<OwnedFrame>,
    /// An earlier attempt was sent and lost; it may already have applied the commands.
    pub after_lost_attempt: bool,
}

/// A worker's connection, opened lazily as its identity and reopened after failures.
pub(super) struct Executor {
    who: Identity,
    conn: Option<Conn>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

impl Executor {
    pub fn new(who: Identity) -> Executor {
        Executor { who, conn: None }
    }

    pub fn identity(&self) -> &Identity {
        &self.who
    }

    /// Sends `commands` as one pipeline; retries on connection failures until `deadline`.
    pub async fn run(
        &mut self,
        shared: &Shared,
        commands: &[Vec<Bytes>],
        deadline: Instant,
    ) -> Result<Outcome, Failure> {
        let upstream = &shared.config.upstream;
        let mut backoff = FIRST_BACKOFF;
        let mut maybe_applied = false;
        loop {
            if self.conn.is_none() {
                match tokio::time::timeout_at(deadline, Conn::open(upstream, &self.who)).await {
                    Ok(Ok(c)) => self.conn = Some(c),
                    Ok(Err(ConnError::Refused(e))) => return Err(Failure::Refused(e)),
                    Ok(Err(ConnError::Io(e))) => {
                        debug!(error = %e, "invalidation connection failed")
                    }
                    Err(_) => return Err(Failure::Unreachable { maybe_applied }),
                }
            }
            if let Some(conn) = &mut self.conn {
                match conn.call(commands).await {
                    Ok(replies) => {
                        return Ok(Outcome {
                            replies,
                            after_lost_attempt: maybe_applied,
                        });
                    }
                    Err(e) => {
                        debug!(error = %e, "invalidation batch lost; will retry");
                        self.conn = None;
                        maybe_applied = true;
                    }
                }
            }
            if Instant::now() + backoff > deadline {
                return Err(Failure::Unreachable { maybe_applied });
            }
            counter!("stormwall_invalidation_retries_total").increment(1);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}
