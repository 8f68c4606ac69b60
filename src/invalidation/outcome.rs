//! How a governed request ended, as a type: the one place that decides, for every outcome,
//! what the client is told, which metric counts it, and whether the request was applied.
//!
//! Workers and admission only ever produce an [`Outcome`]; reply bytes are made here and
//! nowhere else, so an error text can never claim "not applied" for a request that may have
//! been, and every refusal is counted under exactly one reason.

use std::time::Duration;

use bytes::Bytes;
use metrics::counter;

use super::Verdict;
use crate::resp::error_reply;

/// The end of one governed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A delete's exact count of keys this request removed.
    Count(i64),
    /// A flush that Redis executed.
    Flushed,
    /// Redis's own error reply to the client's own command form (`NOPERM`, an ACL key
    /// refusal, `MISCONF`, …): what Redis would have told the client. Not applied.
    Redis(String),
    /// The shield refused or gave up before sending anything: not applied.
    NotApplied(Refusal),
    /// Sent to Redis, and the connection was lost before the answer came: it may or may not
    /// have been applied. The session closes the client's connection, as Redis's own failure
    /// would (G6).
    Unknown,
    /// The shield cannot act as this client: the session runs the client's own command.
    PassThrough(PassReason),
}

/// Why the shield did not apply a request (never sent to Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `flush.deny` lists this command.
    Denied { command: &'static str },
    /// The queue was full and `on_full = "reject"`.
    QueueFull {
        what: &'static str,
        setting: &'static str,
        limit: usize,
    },
    /// The queue stayed full for the whole `max_wait` (`on_full = "wait"`).
    QueueStayedFull { max_wait: Duration },
    /// The request could not be executed before its `max_wait` ran out (the rate budget
    /// would not have allowed it in time, Redis did not answer, or the queue ahead was slow).
    Expired { max_wait: Duration },
    /// Redis could not be reached before the request's deadline.
    Unreachable,
    /// The engine's worker ended before answering (it never does while the engine lives).
    WorkerGone,
    /// A `FLUSHDB` that `flush.rules` scope could not run as a scoped flush, for this reason;
    /// the whole flush is never run in its place.
    Unscoped(String),
    /// A scoped flush whose scan had deleted nothing by `flush.scoped_max_wait`.
    ScopedExpired { max_wait: Duration },
}

/// Why a request runs on the client's own connection instead of the shield's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PassReason {
    /// `invalidation.max_identities` workers are live; this identity has none.
    MaxIdentities,
    /// Redis no longer accepts the identity's credentials on a new connection (changed or
    /// removed password), though the client's own connection stays authenticated.
    Credentials,
    /// Redis refuses a new connection for another reason (`max number of clients reached`,
    /// still loading its data), while the client's own connection may serve.
    Refused,
}

impl PassReason {
    /// Why Redis refused a new connection, from its error.
    pub(super) fn of(error: &str) -> PassReason {
        let auth = ["NOAUTH", "WRONGPASS", "ERR AUTH", "NOPERM"];
        if auth.iter().any(|a| error.starts_with(a)) || error.contains("password") {
            PassReason::Credentials
        } else {
            PassReason::Refused
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            PassReason::MaxIdentities => "max_identities",
            PassReason::Credentials => "credentials",
            PassReason::Refused => "refused",
        }
    }
}

/// Every label of `stormwall_invalidation_rejected_total`, for zeroing at start.
pub(crate) const REJECTED_REASONS: [&str; 5] =
    ["queue_full", "max_wait", "denied", "upstream", "unscoped"];
/// Every label of `stormwall_invalidation_passthrough_total`.
pub(crate) const PASSTHROUGH_REASONS: [&str; 3] = ["max_identities", "credentials", "refused"];

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Denied { .. } => "denied",
            Refusal::QueueFull { .. } => "queue_full",
            Refusal::QueueStayedFull { .. }
            | Refusal::Expired { .. }
            | Refusal::ScopedExpired { .. } => "max_wait",
            Refusal::Unscoped(_) => "unscoped",
            Refusal::Unreachable | Refusal::WorkerGone => "upstream",
        }
    }

    fn text(&self) -> String {
        let wait = |d: &Duration| humantime::format_duration(*d).to_string();
        match self {
            Refusal::Denied { command } => format!(
                "ERR stormwall: {command} is denied by this proxy's policy (flush.deny); not applied"
            ),
            Refusal::QueueFull {
                what,
                setting,
                limit,
            } => format!(
                "BUSY stormwall: invalidation queue is full (too many pending {what}; {setting} = {limit}); not applied, retry later"
            ),
            Refusal::QueueStayedFull { max_wait } => format!(
                "TRYAGAIN stormwall: the invalidation queue stayed full for invalidation.max_wait ({}); not applied",
                wait(max_wait)
            ),
            Refusal::Expired { max_wait } => format!(
                "TRYAGAIN stormwall: the invalidation could not be executed within invalidation.max_wait ({}); not applied",
                wait(max_wait)
            ),
            Refusal::Unreachable => {
                "TRYAGAIN stormwall: Redis is unreachable; the invalidation was not applied".into()
            }
            Refusal::WorkerGone => {
                "ERR stormwall: invalidation worker stopped before answering; not applied".into()
            }
            Refusal::Unscoped(why) => format!(
                "ERR stormwall: this FLUSHDB matches flush.rules but cannot run as a scoped flush ({why}); not applied"
            ),
            Refusal::ScopedExpired { max_wait } => format!(
                "TRYAGAIN stormwall: the scoped flush could not start within flush.scoped_max_wait ({}); not applied",
                wait(max_wait)
            ),
        }
    }
}

impl Outcome {
    /// What the session does, with the outcome counted.
    pub(super) fn verdict(self) -> Verdict {
        match self {
            Outcome::Count(n) => Verdict::Reply(Bytes::from(format!(":{n}\r\n"))),
            Outcome::Flushed => Verdict::Reply(Bytes::from_static(b"+OK\r\n")),
            Outcome::Redis(e) => Verdict::Reply(error_reply(&e)),
            Outcome::NotApplied(refusal) => {
                counter!("stormwall_invalidation_rejected_total", "reason" => refusal.reason())
                    .increment(1);
                if matches!(refusal, Refusal::Denied { .. }) {
                    counter!("stormwall_commands_total", "class" => "denied").increment(1);
                }
                Verdict::Reply(error_reply(&refusal.text()))
            }
            Outcome::Unknown => {
                counter!("stormwall_invalidation_unknown_total").increment(1);
                Verdict::Unknown
            }
            Outcome::PassThrough(reason) => {
                counter!("stormwall_invalidation_passthrough_total", "reason" => reason.label())
                    .increment(1);
                Verdict::PassThrough
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(o: Outcome) -> String {
        match o.verdict() {
            Verdict::Reply(b) => String::from_utf8_lossy(&b).into_owned(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn every_refusal_says_not_applied() {
        let d = Duration::from_secs(1);
        for r in [
            Refusal::Denied {
                command: "FLUSHALL",
            },
            Refusal::QueueFull {
                what: "keys",
                setting: "invalidation.max_pending_keys",
                limit: 1,
            },
            Refusal::QueueStayedFull { max_wait: d },
            Refusal::Expired { max_wait: d },
            Refusal::Unreachable,
            Refusal::WorkerGone,
            Refusal::Unscoped("why".into()),
            Refusal::ScopedExpired { max_wait: d },
        ] {
            let text = reply(Outcome::NotApplied(r));
            assert!(
                text.starts_with('-') && text.contains("not applied"),
                "{text}"
            );
        }
    }

    #[test]
    fn results_are_redis_replies() {
        assert_eq!(reply(Outcome::Count(3)), ":3\r\n");
        assert_eq!(reply(Outcome::Flushed), "+OK\r\n");
        assert_eq!(reply(Outcome::Redis("NOPERM no".into())), "-NOPERM no\r\n");
        assert_eq!(Outcome::Unknown.verdict(), Verdict::Unknown);
        assert_eq!(
            Outcome::PassThrough(PassReason::Credentials).verdict(),
            Verdict::PassThrough
        );
    }
}
