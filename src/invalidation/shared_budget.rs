//! One rate budget for every stormwall in front of the same Redis
//! (`invalidation.shared_budget`).
//!
//! Each sidecar's own budget bounds only what *it* sends: with 50 app pods, each with a
//! stormwall allowing 2,000 invalidation commands a second, Redis can still see 100,000 —
//! the storm the shield exists to stop. So the budget is kept in Redis itself, where every
//! sidecar takes from it: a GCRA (a token bucket kept as one timestamp, the bucket's
//! "theoretical arrival time") per budget, updated by a Lua script that reads Redis's own
//! clock (`TIME`), so all sidecars share one clock and no sidecar's clock skew matters.
//!
//! * **Once per batch.** A worker asks for its batch's keys and commands together: one
//!   `EVALSHA` round trip (plus one `EVAL` when Redis does not know the script yet, after a
//!   restart or `SCRIPT FLUSH`). Both budgets are taken, or neither.
//! * **The local contract.** Like the local budget ([`super::take`]), budget is only spent
//!   for what is then sent: when the budget cannot be had now, the script takes nothing
//!   and says how long until it could, so requests that cannot wait that long are refused
//!   at once without spending anything. Requests larger than a burst are taken in bites of
//!   at most the burst, and what was already paid for a plan is not paid again.
//! * **Nothing left behind.** Each key expires when its bucket would be full again, so an
//!   idle budget is no key at all (and a full bucket is what a missing key means). A key
//!   further ahead than a burst (Redis's clock set back, a client writing the key) counts
//!   as an empty bucket, never as a longer wait.
//! * **stormwall's own identity.** The keys are touched on a connection of stormwall's own
//!   (`shared_budget_user`, `shared_budget_password_file`), never on a client's: the budget
//!   is not something a client's ACL should have to allow, nor something a client could
//!   reach by its own credentials.
//! * **Falling back.** When Redis cannot run the script — an ACL refusal (`NOPERM`), an
//!   unknown command, a script error, a refused login, Redis unreachable on this connection,
//!   no answer before the batch's deadline — the sidecar uses its local budget at the same
//!   rates, says so once in the log (and once when the shared budget works again), and counts
//!   it in `stormwall_shared_budget_fallbacks_total{reason}`. It tries the shared budget
//!   again every [`RETRY`]. Falling back means N sidecars together may send up to N times
//!   the rates again, which is why it is logged and counted.
//!
//! While the shared budget works, the local limiter is *not* applied on top: it would be the
//! same rate (the rates are the total), so for a sidecar alone it only repeats the shared
//! budget's waits, and with several it never binds before the shared one does.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use metrics::{counter, gauge};
use redis_protocol::resp2::types::OwnedFrame;
use tokio::time::Instant;

use super::Shared;
use super::budget::Scaled;
use crate::config::Config;
use crate::upstream::{Conn, ConnError, Identity};

/// How long a sidecar that fell back stays on its local budget before it tries the shared
/// one again (one attempt, with the next batch).
pub(super) const RETRY: Duration = Duration::from_secs(1);

/// Why the shared budget could not be used: the `reason` label of
/// `stormwall_shared_budget_fallbacks_total`.
pub(crate) const FALLBACK_REASONS: &[&str] = &["noperm", "auth", "error", "unreachable", "timeout"];

/// The GCRA, for both budgets at once (a budget's key holds the time, in µs on Redis's
/// clock, at which its bucket is full again; missing or past means full now). KEYS: the keys budget, the commands budget. ARGV, per
/// budget: units wanted, the interval between units (µs), the burst's span (µs = burst ×
/// interval). Returns 0 when both were taken; otherwise the µs until both could be (nothing
/// is taken then).
const SCRIPT: &str = r#"-- stormwall shared invalidation budget (GCRA)
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
local after = {}
for i = 1, 2 do
  local n = tonumber(ARGV[3 * i - 2])
  if n > 0 then
    local interval = tonumber(ARGV[3 * i - 1])
    local span = tonumber(ARGV[3 * i])
    local tat = tonumber(redis.call('GET', KEYS[i])) or now
    if tat < now then tat = now end
    -- Never more than a burst ahead: a bucket is at worst empty, whatever the key says
    -- (Redis's clock set back, a client's write). Repaired at once, so it refills.
    if tat > now + span then
      tat = now + span
      redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX', math.ceil(span / 1000) + 1)
    end
    local next_tat = tat + n * interval
    local early = next_tat - span - now
    if early > 0 then
      if early > wait then wait = early end
    else
      after[i] = next_tat
    end
  end
end
if wait > 0 then return math.ceil(wait) end
for i, next_tat in pairs(after) do
  redis.call('SET', KEYS[i], string.format('%.17g', next_tat),
    'PX', math.ceil((next_tat - now) / 1000) + 1)
end
return 0
"#;

/// Budget units: keys deleted, invalidation commands sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Units {
    pub keys: u64,
    pub commands: u64,
}

impl Units {
    pub fn new(keys: u64, commands: u64) -> Units {
        Units { keys, commands }
    }
}

/// Takes `want` (less what `paid` says this plan already took) from the shared budget when
/// `invalidation.shared_budget` is on and works, else from the local one; the same contract
/// as [`super::take`]: `Err(when)` if the rest cannot be had by `deadline`, nothing more
/// being taken then. The call sites' one line.
///
/// `budgets` are the keys and commands budgets as the adaptive controller scales them now
/// ([`Shared::budgets`]): the shared budget is asked at those rates too, so a sidecar that
/// sees Redis slow down charges each unit more of the shared timeline, slowing every
/// sidecar that shares it.
pub(super) async fn take(
    shared: &Shared,
    (keys, commands): (&Scaled, &Scaled),
    want: Units,
    paid: &mut Units,
    deadline: Instant,
) -> Result<(), Instant> {
    if !shared.config.invalidation.shared_budget {
        gauge!("stormwall_shared_budget_active").set(0.0);
    } else if shared.budget.usable() {
        let rates = (
            Rate::new(keys.per_second, keys.burst),
            Rate::new(commands.per_second, commands.burst),
        );
        match shared
            .budget
            .take(&shared.config, rates, want, paid, deadline)
            .await
        {
            Ok(result) => {
                shared.budget.works();
                return result;
            }
            Err(failure) => shared.budget.failed(&failure),
        }
    }
    super::take(
        &commands.limiter,
        commands.burst,
        commands.per_second,
        want.commands,
        &mut paid.commands,
        deadline,
    )
    .await?;
    super::take(
        &keys.limiter,
        keys.burst,
        keys.per_second,
        want.keys,
        &mut paid.keys,
        deadline,
    )
    .await
}

/// Why one attempt at the shared budget failed.
#[derive(Debug)]
enum Failure {
    /// An ACL rule refuses the script, or a command or key in it.
    NoPerm(String),
    /// Redis refused the budget connection's login (or its password file cannot be read).
    Auth(String),
    /// Any other error from Redis (an unknown or renamed command, a script error, `-OOM`…).
    Error(String),
    /// The budget connection could not be opened, or was lost.
    Unreachable(io::Error),
    /// Redis did not answer before the batch's deadline (or `upstream.reply_timeout`).
    Timeout,
}

impl Failure {
    fn reason(&self) -> &'static str {
        match self {
            Failure::NoPerm(_) => "noperm",
            Failure::Auth(_) => "auth",
            Failure::Error(_) => "error",
            Failure::Unreachable(_) => "unreachable",
            Failure::Timeout => "timeout",
        }
    }

    fn of_io(e: io::Error) -> Failure {
        if e.kind() == io::ErrorKind::TimedOut {
            Failure::Timeout
        } else {
            Failure::Unreachable(e)
        }
    }

    /// An error reply to the script.
    fn of_reply(e: String) -> Failure {
        // Redis 7.0 reports an ACL refusal inside the script as an `ERR` naming the user.
        if e.starts_with("NOPERM") || e.contains("The user executing the script can't") {
            Failure::NoPerm(e)
        } else if e.starts_with("NOAUTH") || e.starts_with("WRONGPASS") {
            Failure::Auth(e)
        } else {
            Failure::Error(e)
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoPerm(e) | Failure::Auth(e) | Failure::Error(e) => f.write_str(e),
            Failure::Unreachable(e) => write!(f, "{e}"),
            Failure::Timeout => f.write_str("Redis did not answer in time"),
        }
    }
}

/// What one call of the script said.
enum Answer {
    Taken,
    /// Nothing taken; both bites could be had after this long (if nobody else takes first).
    Wait(Duration),
    /// The budget connection stayed busy with another worker's call until the deadline.
    Late,
}

/// Who the budget connection logs in as, as configured when it was opened.
#[derive(Clone, PartialEq, Eq)]
struct Login {
    user: Option<String>,
    password_file: Option<PathBuf>,
}

impl Login {
    fn of(config: &Config) -> Login {
        Login {
            user: config.invalidation.shared_budget_user.clone(),
            password_file: config.invalidation.shared_budget_password_file.clone(),
        }
    }

    fn identity(&self) -> Result<Identity, Failure> {
        let password = match &self.password_file {
            Some(path) => Some(read_password(path).map_err(|e| {
                Failure::Auth(format!(
                    "cannot read invalidation.shared_budget_password_file {}: {e}",
                    path.display()
                ))
            })?),
            None => None,
        };
        Ok(Identity {
            user: self.user.clone().map(Bytes::from),
            password,
            db: 0,
        })
    }
}

/// The password in `path`, without a trailing line break.
fn read_password(path: &Path) -> io::Result<Bytes> {
    let mut text = std::fs::read(path)?;
    while matches!(text.last(), Some(b'\n' | b'\r')) {
        text.pop();
    }
    if text.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is empty",
        ));
    }
    Ok(Bytes::from(text))
}

/// Where the sidecar takes its budget from.
enum State {
    Shared,
    /// On the local budget since a failure; the shared one is tried again from `retry_at`.
    Fallback {
        retry_at: Instant,
    },
}

/// The shared budget's connection and whether it works. One per process; the engine keeps
/// it across reloads.
pub(super) struct SharedBudget {
    conn: tokio::sync::Mutex<Option<(Conn, Login)>>,
    state: Mutex<State>,
    sha: String,
}

impl Default for SharedBudget {
    fn default() -> Self {
        SharedBudget {
            conn: tokio::sync::Mutex::new(None),
            state: Mutex::new(State::Shared),
            sha: sha1_smol::Sha1::from(SCRIPT).digest().to_string(),
        }
    }
}

/// One budget's GCRA parameters.
struct Rate {
    burst: u64,
    /// Time per unit.
    unit: Duration,
}

impl Rate {
    fn new(per_second: u32, burst: u32) -> Rate {
        Rate {
            burst: u64::from(burst.max(1)),
            unit: Duration::from_secs(1) / per_second.max(1),
        }
    }

    /// The script's arguments for `n` units: n, interval (µs), the burst's span (µs).
    fn args(&self, n: u64) -> [Bytes; 3] {
        let interval = self.unit.as_secs_f64() * 1e6;
        [
            Bytes::from(n.to_string()),
            Bytes::from(format!("{interval}")),
            Bytes::from(format!("{}", interval * self.burst as f64)),
        ]
    }

    /// At least how long `n` more units take after the current bite, however full the
    /// budget is now.
    fn later(&self, n: u64) -> Duration {
        self.unit
            .saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

impl SharedBudget {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Never held across an await; a poisoned state is still a valid state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether to try the shared budget for this take: it works, or the time to try it
    /// again has come (then the next retry is scheduled already, so concurrent workers do
    /// not all try at once).
    fn usable(&self) -> bool {
        let mut state = self.state();
        match &mut *state {
            State::Shared => true,
            State::Fallback { retry_at } => {
                let now = Instant::now();
                if now < *retry_at {
                    return false;
                }
                *retry_at = now + RETRY;
                true
            }
        }
    }

    /// The shared budget answered.
    fn works(&self) {
        let mut state = self.state();
        if matches!(*state, State::Fallback { .. }) {
            tracing::info!(
                "shared invalidation budget works again: this stormwall takes its budget \
                 from Redis, shared with every stormwall in front of it"
            );
        }
        *state = State::Shared;
        gauge!("stormwall_shared_budget_active").set(1.0);
    }

    /// The shared budget failed: from now on (until a retry works) the local budget.
    fn failed(&self, failure: &Failure) {
        let mut state = self.state();
        if matches!(*state, State::Shared) {
            tracing::warn!(
                reason = failure.reason(),
                error = %failure,
                "shared invalidation budget unavailable: falling back to this stormwall's \
                 local budget (the same rates, for this stormwall alone) until Redis runs \
                 the budget script again"
            );
            counter!("stormwall_shared_budget_fallbacks_total", "reason" => failure.reason())
                .increment(1);
        } else {
            tracing::debug!(error = %failure, "shared invalidation budget still unavailable");
        }
        *state = State::Fallback {
            retry_at: Instant::now() + RETRY,
        };
        gauge!("stormwall_shared_budget_active").set(0.0);
    }

    /// Takes `want` less `paid` from the shared budget, in bites of at most each burst,
    /// keys and commands together. `Ok(Err(when))`: not by `deadline` (nothing more taken).
    async fn take(
        &self,
        config: &Config,
        (keys, commands): (Rate, Rate),
        want: Units,
        paid: &mut Units,
        deadline: Instant,
    ) -> Result<Result<(), Instant>, Failure> {
        loop {
            let left = Units::new(
                want.keys.saturating_sub(paid.keys),
                want.commands.saturating_sub(paid.commands),
            );
            if left == Units::default() {
                return Ok(Ok(()));
            }
            let bite = Units::new(left.keys.min(keys.burst), left.commands.min(commands.burst));
            let later = keys
                .later(left.keys - bite.keys)
                .max(commands.later(left.commands - bite.commands));
            if Instant::now() + later > deadline {
                return Ok(Err(Instant::now() + later));
            }
            match self.call(config, &keys, &commands, bite, deadline).await? {
                Answer::Taken => {
                    paid.keys += bite.keys;
                    paid.commands += bite.commands;
                    counter!("stormwall_shared_budget_calls_total", "result" => "taken")
                        .increment(1);
                }
                Answer::Wait(wait) => {
                    counter!("stormwall_shared_budget_calls_total", "result" => "wait")
                        .increment(1);
                    let ready = Instant::now() + wait + later;
                    if ready > deadline {
                        return Ok(Err(ready));
                    }
                    tokio::time::sleep(wait).await;
                }
                // Strictly after the deadline, so the caller refuses the earliest request.
                Answer::Late => return Ok(Err(deadline + Duration::from_micros(1))),
            }
        }
    }

    /// One call of the script for `bite`, on the budget connection (opened first if needed).
    async fn call(
        &self,
        config: &Config,
        keys: &Rate,
        commands: &Rate,
        bite: Units,
        deadline: Instant,
    ) -> Result<Answer, Failure> {
        let Ok(mut slot) = tokio::time::timeout_at(deadline, self.conn.lock()).await else {
            return Ok(Answer::Late);
        };
        let login = Login::of(config);
        if let Some((conn, was)) = slot.as_mut()
            && (*was != login || conn.is_closed())
        {
            *slot = None;
        }
        let conn = match slot.as_mut() {
            Some((conn, _)) => conn,
            None => {
                let who = login.identity()?;
                let conn = match Conn::open(&config.upstream, &who, deadline).await {
                    Ok(conn) => conn,
                    Err(ConnError::Refused(e)) => return Err(Failure::of_reply(e)),
                    Err(ConnError::Io(e)) => return Err(Failure::of_io(e)),
                };
                &mut slot.insert((conn, login)).0
            }
        };
        let prefix = &config.invalidation.shared_budget_key;
        let mut args = vec![
            Bytes::from_static(b"EVALSHA"),
            Bytes::from(self.sha.clone()),
            Bytes::from_static(b"2"),
            Bytes::from(format!("{prefix}:keys")),
            Bytes::from(format!("{prefix}:commands")),
        ];
        args.extend(keys.args(bite.keys));
        args.extend(commands.args(bite.commands));
        let mut reply = call_one(conn, &args, deadline).await;
        if matches!(&reply, Ok(OwnedFrame::Error(e)) if e.starts_with("NOSCRIPT")) {
            args[0] = Bytes::from_static(b"EVAL");
            args[1] = Bytes::from_static(SCRIPT.as_bytes());
            reply = call_one(conn, &args, deadline).await;
        }
        let answer = match reply {
            Ok(OwnedFrame::Integer(0)) => Ok(Answer::Taken),
            Ok(OwnedFrame::Integer(us)) if us > 0 => {
                Ok(Answer::Wait(Duration::from_micros(us.unsigned_abs())))
            }
            Ok(OwnedFrame::Error(e)) => Err(Failure::of_reply(e)),
            Ok(other) => Err(Failure::Error(format!(
                "unexpected reply to the budget script: {other:?}"
            ))),
            Err(e) => Err(Failure::of_io(e)),
        };
        if matches!(
            answer,
            Err(Failure::Unreachable(_) | Failure::Timeout | Failure::Error(_))
        ) {
            // Lost, late (its reply would arrive out of step) or answered nonsense: a fresh
            // connection next time.
            *slot = None;
        }
        answer
    }
}

async fn call_one(conn: &mut Conn, args: &[Bytes], deadline: Instant) -> io::Result<OwnedFrame> {
    let mut replies = conn.call_until(&[args.to_vec()], deadline).await?;
    replies
        .pop()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_named_by_reason() {
        let cases = [
            (
                "NOPERM this user has no permissions to run the 'evalsha' command",
                "noperm",
            ),
            (
                "ERR The user executing the script can't run this command or subcommand \
                 script: 5db9a87a22fb7df9f709919f5d62eefe0ea20473, on @user_script:3.",
                "noperm",
            ),
            (
                "ERR The user executing the script can't access at least one of the keys \
                 mentioned in the command script: 5db9…, on @user_script:11.",
                "noperm",
            ),
            ("NOAUTH Authentication required.", "auth"),
            ("ERR unknown command 'EVALSHA'", "error"),
            (
                "OOM command not allowed when used memory > 'maxmemory'.",
                "error",
            ),
        ];
        for (error, reason) in cases {
            let failure = Failure::of_reply(error.into());
            assert_eq!(failure.reason(), reason, "{error}");
            assert!(FALLBACK_REASONS.contains(&failure.reason()));
        }
        assert_eq!(
            Failure::of_io(io::ErrorKind::TimedOut.into()).reason(),
            "timeout"
        );
        assert_eq!(
            Failure::of_io(io::ErrorKind::ConnectionRefused.into()).reason(),
            "unreachable"
        );
    }

    #[test]
    fn script_arguments_are_microseconds() {
        let rate = Rate::new(2_000, 200);
        let args: Vec<String> = rate
            .args(10)
            .iter()
            .map(|a| String::from_utf8(a.to_vec()).unwrap())
            .collect();
        assert_eq!(args, ["10", "500", "100000"]);
        // Faster than one unit per microsecond still has a non-zero interval.
        let fast = Rate::new(3_000_000, 10);
        let interval: f64 = String::from_utf8(fast.args(1)[1].to_vec())
            .unwrap()
            .parse()
            .unwrap();
        assert!(interval > 0.0 && interval < 1.0, "{interval}");
    }

    #[test]
    fn a_password_file_loses_its_line_break() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        assert_eq!(read_password(&path).unwrap(), Bytes::from_static(b"s3cret"));
        std::fs::write(&path, "\n").unwrap();
        assert!(read_password(&path).is_err());
    }
}
