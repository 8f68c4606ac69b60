//! Whether an identity may run a command, asked of Redis without running it.
//!
//! The shield may send a different form than the client did (`UNLINK` for `DEL`, `ASYNC` for
//! a plain flush), but a client must be allowed or refused exactly as Redis would allow or
//! refuse *its own* command (G5). Redis checks ACLs when a command is queued inside `MULTI`,
//! so `MULTI; <form>…; DISCARD` answers `+QUEUED` or `-NOPERM` per form with no side effect
//! (besides entries in `ACL LOG`). `MULTI` is sent on its own and awaited: were it refused,
//! forms pipelined behind it would run for real.

use std::io;

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::time::Instant;

use crate::upstream::Conn;

/// Redis's verdict on one command form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Access {
    Allowed,
    /// Refused at queue time, with Redis's error (what the client would get).
    Denied(String),
}

/// Asks whether the connection's user may run each of `forms`. `None` when it cannot be
/// asked (the user may not run `MULTI`). An error leaves the connection unusable.
pub(super) async fn check(
    conn: &mut Conn,
    forms: &[Vec<Bytes>],
    deadline: Instant,
) -> io::Result<Option<Vec<Access>>> {
    let multi = conn
        .call_until(&[vec![Bytes::from_static(b"MULTI")]], deadline)
        .await?;
    if !matches!(multi.first(), Some(OwnedFrame::SimpleString(s)) if s == b"OK") {
        return Ok(None);
    }
    let mut commands = forms.to_vec();
    commands.push(vec![Bytes::from_static(b"DISCARD")]);
    let replies = conn.call_until(&commands, deadline).await?;
    let out_of_step = || io::Error::new(io::ErrorKind::InvalidData, "unexpected reply to a check");
    match replies.last() {
        Some(OwnedFrame::SimpleString(s)) if s == b"OK" => {}
        _ => return Err(out_of_step()),
    }
    replies[..forms.len()]
        .iter()
        .map(|reply| match reply {
            OwnedFrame::SimpleString(s) if s == b"QUEUED" => Ok(Access::Allowed),
            // The command is allowed; the probe's key is not. Key permissions are the same
            // for every form of one command, and the real command gets Redis's own answer.
            OwnedFrame::Error(e) if is_key_refusal(e) => Ok(Access::Allowed),
            OwnedFrame::Error(e) => Ok(Access::Denied(e.clone())),
            _ => Err(out_of_step()),
        })
        .collect::<io::Result<Vec<_>>>()
        .map(Some)
}

/// `NOPERM` for a key (or channel) named in the command, not for the command itself.
pub(super) fn is_key_refusal(error: &str) -> bool {
    error.starts_with("NOPERM") && (error.contains(" keys ") || error.contains(" channel"))
}

/// `NOPERM` for the command itself.
pub(super) fn is_command_refusal(error: &str) -> bool {
    error.starts_with("NOPERM") && !is_key_refusal(error)
}
