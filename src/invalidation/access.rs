//! Whether an identity may run a command, asked of Redis without running it.
//!
//! The shield may send a different form than the client did (`UNLINK` for `DEL`, `ASYNC` for
//! a plain flush), but a client must be allowed or refused exactly as Redis would allow or
//! refuse *its own* command (G5). Redis checks ACLs when a command is queued inside `MULTI`,
//! so `MULTI; <form>…; DISCARD` answers `+QUEUED` or `-NOPERM` per form with no side effect
//! (besides entries in `ACL LOG`). The answer is asked for each batch that needs it, never
//! cached: a cached "allowed" could outlive an `ACL SETUSER` that revoked it, while an answer
//! asked after the request arrived and before it is answered fits a sequential order.
//!
//! Only two refusals are the same inside `MULTI` as outside, and so a form's own: `NOPERM`
//! (ACL rules) and `unknown command` (`rename-command`). Others say nothing about the form:
//! over `maxmemory` Redis refuses every command queued inside `MULTI` with `-OOM`, though a
//! plain `DEL` or flush would run.
//!
//! Were `MULTI` itself refused, the forms behind it would run for real. So forms that are
//! not harmless when run (flushes) are sent only after `MULTI` was accepted; harmless forms
//! (a delete of a key nobody uses) go in the same write, and the check costs one round trip.

use std::io;

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::time::Instant;

use crate::upstream::Conn;

/// A key named in delete forms being checked. Were the check's `MULTI` refused, the forms
/// would delete it for real: it is no application's key. It is valid UTF-8 because Redis
/// quotes it in some refusals (`-ERR unknown command 'DEL', with args beginning with: …`
/// under `rename-command`), and an error reply is read as text.
pub(super) const PROBE_KEY: &[u8] = b"{stormwall}:acl-probe:never-set";

/// [`PROBE_KEY`], or in a cluster a key like it in `slot` (the batch's): a master answers
/// `MOVED` for a key of a slot it does not serve, which says nothing of the identity's
/// rights.
pub(super) fn probe_key(slot: Option<u16>) -> Bytes {
    match slot {
        None => Bytes::from_static(PROBE_KEY),
        Some(slot) => Bytes::from(format!(
            "{{{}}}stormwall:acl-probe:never-set",
            crate::cluster::slot::tag_for(slot)
        )),
    }
}

/// Redis's verdict on one command form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Access {
    Allowed,
    /// Refused for what it is (an ACL rule, a renamed command), with Redis's error: what the
    /// client would get for this form.
    Denied(String),
    /// Refused at queue time for being inside `MULTI` (`-OOM` over `maxmemory` refuses every
    /// queued command, though a plain `DEL` or flush is allowed), or for a passing state
    /// (`-MISCONF`, `-READONLY`): says nothing about the form. Never a client's answer, and
    /// never enough to rewrite.
    Unsure,
}

/// Whether running `forms` for real would change nothing (so they may follow `MULTI` in the
/// same write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Forms {
    Harmless,
    Destructive,
}

/// Asks whether the connection's user may run each of `forms`. `None` when it cannot be
/// asked (the user may not run `MULTI`). An error leaves the connection unusable; one of
/// kind `PermissionDenied` says the user may not run `DISCARD`, so it can never be asked.
pub(super) async fn check(
    conn: &mut Conn,
    forms: &[Vec<Bytes>],
    kind: Forms,
    deadline: Instant,
) -> io::Result<Option<Vec<Access>>> {
    let multi = vec![Bytes::from_static(b"MULTI")];
    let mut commands = forms.to_vec();
    commands.push(vec![Bytes::from_static(b"DISCARD")]);
    let replies = match kind {
        Forms::Harmless => {
            commands.insert(0, multi);
            conn.call_until(&commands, deadline).await?
        }
        Forms::Destructive => {
            let mut replies = conn.call_until(&[multi], deadline).await?;
            if !is_ok(replies.first()) {
                return Ok(None);
            }
            replies.extend(conn.call_until(&commands, deadline).await?);
            replies
        }
    };
    if !is_ok(replies.first()) {
        return Ok(None);
    }
    let out_of_step = || io::Error::new(io::ErrorKind::InvalidData, "unexpected reply to a check");
    if replies.len() == forms.len() + 2 && matches!(replies.last(), Some(OwnedFrame::Error(_))) {
        // `DISCARD` refused (an ACL rule): the connection is still inside `MULTI`, and every
        // later check would end the same way.
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "DISCARD refused",
        ));
    }
    if !is_ok(replies.last()) || replies.len() != forms.len() + 2 {
        return Err(out_of_step());
    }
    replies[1..=forms.len()]
        .iter()
        .map(|reply| match reply {
            OwnedFrame::SimpleString(s) if s == b"QUEUED" => Ok(Access::Allowed),
            // The command is allowed; the probe's key is not. Key permissions are the same
            // for every form of one command, and the real command gets Redis's own answer.
            OwnedFrame::Error(e) if is_key_refusal(e) => Ok(Access::Allowed),
            OwnedFrame::Error(e) if is_own_refusal(e) => Ok(Access::Denied(e.clone())),
            OwnedFrame::Error(_) => Ok(Access::Unsure),
            _ => Err(out_of_step()),
        })
        .collect::<io::Result<Vec<_>>>()
        .map(Some)
}

fn is_ok(reply: Option<&OwnedFrame>) -> bool {
    matches!(reply, Some(OwnedFrame::SimpleString(s)) if s == b"OK")
}

/// `NOPERM` for a key (or channel) named in the command, not for the command itself.
pub(super) fn is_key_refusal(error: &str) -> bool {
    error.starts_with("NOPERM") && (error.contains(" keys ") || error.contains(" channel"))
}

/// `NOPERM` for the command itself.
pub(super) fn is_command_refusal(error: &str) -> bool {
    error.starts_with("NOPERM") && !is_key_refusal(error)
}

/// A refusal of the command form itself, the same inside `MULTI` as outside: an ACL rule,
/// or a command Redis does not know (`rename-command`).
fn is_own_refusal(error: &str) -> bool {
    is_command_refusal(error) || error.starts_with("ERR unknown command")
}
