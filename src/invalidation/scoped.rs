//! Scoped flushes: a `FLUSHDB` from a client that a `[[flush.rules]]` entry matches becomes
//! the deletion of the keys matching the rule's pattern only.
//!
//! Why this exists: applications often share one Redis database, each under its own key
//! prefix, while their cache libraries implement "clear the cache" as `FLUSHDB` —
//! django-redis's `cache.clear()` ignores `KEY_PREFIX`. One application's clear then empties
//! every application's cache. A rule names the application (by client name, ACL user or
//! database) and its keys; the shield turns that application's `FLUSHDB` into
//! `SCAN cursor MATCH pattern COUNT 1000` and a delete (`invalidation.delete_command`) of
//! what each step found, paced by the shield's key and command budgets so that Redis keeps
//! serving everyone else, and answers `+OK` only once the scan is complete (G2): every key
//! that matched when the scan started and still exists when it ends is gone.
//!
//! Coalescing is the flush worker's ([`flush`](super::flush)): one worker per scope (identity
//! and pattern) waits for the scope's spacing (`flush.min_interval`, `flush.burst`), then one
//! scan serves every request queued by the time it starts. A request arriving while a scan
//! runs is answered by the next scan, never by one that started before it arrived.
//!
//! Permissions (G5): before each scan Redis is asked, as for a flush
//! ([`access`](super::access)), whether the identity may run the client's own `FLUSHDB`
//! form, `SCAN` and the delete command. A refusal of any of them is the client's answer, and
//! nothing is deleted: the shield never deletes for a client whose `FLUSHDB` Redis refuses,
//! nor with commands the client may not run.
//!
//! Deadlines: a scan of millions of keys at the key budget takes far longer than a flush, so
//! a scoped request's deadline is `flush.scoped_max_wait` from its arrival, covering its wait
//! and its scan. A request whose deadline passes before its scan deleted anything is refused
//! (`-TRYAGAIN … not applied`). One whose deadline passes after that was partly applied,
//! which no reply can say: its connection is closed, as for a request whose fate is unknown
//! (G4, G6). When no request waits for a scan any more (clients gone, deadlines passed), the
//! scan stops: nothing is sent for nobody.
//!
//! A lost connection in mid-scan is not a lost answer: the scan starts over on a new
//! connection (deleting again cannot make `+OK` untrue), until the deadline.

use std::sync::Weak;

use bytes::Bytes;
use metrics::counter;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::access::{self, Access, Forms, PROBE_KEY};
use super::executor::{Executor, NotSent};
use super::flush::Spacing;
use super::outcome::{Outcome, Refusal};
use super::shared_budget::{Units, take};
use super::{Live, Registry, ScopedJob, expire_before, next_job, prune, scopers, send_margin};
use crate::config::{DeleteCommand, FlushRule};
use crate::upstream::Identity;

/// Hash table slots Redis visits per `SCAN` call: about as many keys, cheap for Redis each
/// (a fraction of a millisecond), few round trips over a million keys.
const SCAN_COUNT: &[u8] = b"1000";

/// What a session knows of its client, for matching rules.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub identity: &'a Identity,
    /// Whether `identity` is what Redis has (a transaction may have changed it unseen).
    pub identity_known: bool,
    /// The name `CLIENT SETNAME` / `HELLO … SETNAME` gave the connection.
    pub name: Option<&'a [u8]>,
    pub name_known: bool,
}

/// What `flush.rules` make of a client's `FLUSHDB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// No rule matches: a flush like any other.
    Whole,
    /// The first matching rule's pattern: the keys the `FLUSHDB` deletes instead.
    Pattern(Bytes),
    /// A rule before any match depends on state stormwall does not know (a name or identity
    /// set by a command `EXEC` ran): whether it matches cannot be told.
    Unknown,
}

/// The scope of `client`'s `FLUSHDB` under `rules` (first match wins).
pub fn scope_of(rules: &[FlushRule], client: Client<'_>) -> Scope {
    for rule in rules {
        if (rule.db.is_some() || rule.user.is_some()) && !client.identity_known {
            return Scope::Unknown;
        }
        if rule.db.is_some_and(|db| db != client.identity.db) {
            continue;
        }
        if let Some(user) = &rule.user {
            // A connection that never named a user is the default user.
            let own = client.identity.user.as_deref().unwrap_or(b"default");
            if own != user.as_bytes() {
                continue;
            }
        }
        if let Some(glob) = &rule.client_name {
            if !client.name_known {
                return Scope::Unknown;
            }
            if !client.name.is_some_and(|n| glob_match(glob.as_bytes(), n)) {
                continue;
            }
        }
        return Scope::Pattern(Bytes::copy_from_slice(rule.pattern.as_bytes()));
    }
    Scope::Whole
}

/// Redis's glob (`KEYS`, `SCAN MATCH`, `CLIENT KILL`…): `*`, `?`, `[abc]`, `[^a-z]`, `\x`.
pub fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    // Iterative, backtracking to the last `*` only: linear-ish, no recursion to exhaust.
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, i));
            p += 1;
            continue;
        }
        if let Some(len) = one(&pattern[p..], s[i]) {
            p += len;
            i += 1;
            continue;
        }
        match star {
            Some((sp, si)) => {
                p = sp + 1;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether the pattern's first token matches `c`, and how long that token is.
fn one(pattern: &[u8], c: u8) -> Option<usize> {
    match *pattern.first()? {
        b'?' => Some(1),
        b'*' => None,
        b'\\' if pattern.len() >= 2 => (pattern[1] == c).then_some(2),
        b'[' => {
            let mut j = 1;
            let negate = pattern.get(j) == Some(&b'^');
            if negate {
                j += 1;
            }
            let mut hit = false;
            // Redis ends an unterminated class at the end of the pattern.
            while j < pattern.len() && pattern[j] != b']' {
                if pattern[j] == b'\\' && j + 1 < pattern.len() {
                    hit |= pattern[j + 1] == c;
                    j += 2;
                } else if j + 2 < pattern.len() && pattern[j + 1] == b'-' {
                    let (a, b) = (pattern[j], pattern[j + 2]);
                    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                    hit |= (lo..=hi).contains(&c);
                    j += 3;
                } else {
                    hit |= pattern[j] == c;
                    j += 1;
                }
            }
            let len = (j + 1).min(pattern.len());
            (hit != negate).then_some(len)
        }
        other => (other == c).then_some(1),
    }
}

/// The client's flush forms, by the index [`form`] gives: plain, `SYNC`, `ASYNC`.
fn form(sync: Option<bool>) -> usize {
    match sync {
        None => 0,
        Some(true) => 1,
        Some(false) => 2,
    }
}

/// Serves one scope (an identity and a pattern) until it is idle for
/// `identity_idle_timeout`.
pub(super) async fn worker(
    live: Live,
    registry: Weak<Registry>,
    (who, pattern): (Identity, Bytes),
    mut rx: mpsc::UnboundedReceiver<ScopedJob>,
) {
    let key = (who.clone(), pattern.clone());
    let mut exec = Executor::new(who.clone());
    let mut spacing: Option<Spacing> = None;
    while let Some(first) = next_job(&live, &registry, scopers, &key, &who, &mut rx).await {
        Spacing::wait_turn(&mut spacing, &live.load_full()).await;
        // Every request queued by now, and none that arrives later, is answered by this scan.
        let mut waiters = vec![first];
        while let Ok(job) = rx.try_recv() {
            waiters.push(job);
        }
        counter!("stormwall_scoped_flushes_requested_total").increment(waiters.len() as u64);
        let mut scan = Scan {
            exec: &mut exec,
            pattern: &pattern,
            deleted_any: false,
        };
        scan.run(&live, waiters).await;
    }
}

/// One scan of a pattern, for the requests it answers.
struct Scan<'a> {
    exec: &'a mut Executor,
    pattern: &'a Bytes,
    /// A delete was sent: from then on, a request that ends before the scan is done was
    /// partly applied.
    deleted_any: bool,
}

/// The latest deadline among `jobs`: the scan goes on while anyone still waits for it.
fn latest(jobs: &[ScopedJob]) -> Instant {
    jobs.iter()
        .map(|j| j.deadline)
        .max()
        .unwrap_or_else(Instant::now)
}

impl Scan<'_> {
    /// How a request that ends now, before the scan is done, ended.
    fn cut_short(&self, max_wait: std::time::Duration) -> Outcome {
        if self.deleted_any {
            Outcome::Unknown
        } else {
            Outcome::NotApplied(Refusal::ScopedExpired { max_wait })
        }
    }

    /// Ends every request with `outcome`, or unknown if keys were already deleted for them.
    fn end_all(&self, waiters: Vec<ScopedJob>, outcome: Outcome) {
        let outcome = if self.deleted_any {
            Outcome::Unknown
        } else {
            outcome
        };
        for job in waiters {
            job.answer(outcome.clone());
        }
    }

    async fn run(&mut self, live: &Live, mut waiters: Vec<ScopedJob>) {
        let started = Instant::now();
        let requests = waiters.len();
        let mut checked = false;
        let mut counted = false;
        let mut cursor = Bytes::from_static(b"0");
        // The scan returned cursor 0: once `found` is deleted, it is complete.
        let mut done = false;
        // Keys the last `SCAN` returned, not yet deleted (one `SCAN`'s worth at most).
        let mut found: Vec<Bytes> = Vec::new();
        let mut removed = 0u64;
        let mut paid = Units::default();
        loop {
            let shared = live.load_full();
            let inv = &shared.config.invalidation;
            let max_wait = shared.config.flush.scoped_max_wait;
            let margin = send_margin(max_wait);
            prune(&mut waiters, margin, || self.cut_short(max_wait));
            if waiters.is_empty() {
                if counted {
                    tracing::debug!(
                        db = self.exec.identity().db,
                        keys = removed,
                        "scoped flush stopped: no request waits for it any more"
                    );
                }
                return;
            }
            if done && found.is_empty() {
                tracing::info!(
                    db = self.exec.identity().db,
                    pattern = %String::from_utf8_lossy(self.pattern),
                    keys = removed,
                    requests,
                    answered = waiters.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "scoped flush done"
                );
                waiters.into_iter().for_each(|j| j.answer(Outcome::Flushed));
                return;
            }
            let deadline = latest(&waiters);
            let conn = match self.exec.ready(&shared.config.upstream, deadline).await {
                Ok(conn) => conn,
                Err(NotSent::Refused(e)) => {
                    let why = format!("Redis refuses a connection as this client: {e}");
                    return self.end_all(waiters, Outcome::NotApplied(Refusal::Unscoped(why)));
                }
                Err(_) => {
                    if !self.exec.pause(deadline).await {
                        return self.end_all(waiters, Outcome::NotApplied(Refusal::Unreachable));
                    }
                    continue;
                }
            };
            let delete: &'static [u8] = match inv.delete_command {
                DeleteCommand::Unlink => b"UNLINK",
                DeleteCommand::Del => b"DEL",
            };
            if !checked {
                let flush = |arg: Option<&'static [u8]>| {
                    let mut c = vec![Bytes::from_static(b"FLUSHDB")];
                    c.extend(arg.map(Bytes::from_static));
                    c
                };
                let forms = vec![
                    flush(None),
                    flush(Some(b"SYNC")),
                    flush(Some(b"ASYNC")),
                    scan_command(self.pattern, &Bytes::from_static(b"0"), b"1"),
                    vec![Bytes::from_static(delete), Bytes::from_static(PROBE_KEY)],
                ];
                let access = match access::check(conn, &forms, Forms::Destructive, deadline).await {
                    Ok(Some(access)) => access,
                    Ok(None) => {
                        let why = "its permissions cannot be checked (Redis refused MULTI)";
                        let refusal = Refusal::Unscoped(why.into());
                        return self.end_all(waiters, Outcome::NotApplied(refusal));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                        self.exec.discard();
                        let why = "its permissions cannot be checked (Redis refused DISCARD)";
                        let refusal = Refusal::Unscoped(why.into());
                        return self.end_all(waiters, Outcome::NotApplied(refusal));
                    }
                    Err(_) => {
                        self.exec.discard();
                        continue;
                    }
                };
                // Each request's own FLUSHDB form first: refused as Redis refuses it.
                for job in std::mem::take(&mut waiters) {
                    match &access[form(job.what)] {
                        Access::Denied(e) => job.answer(Outcome::Redis(e.clone())),
                        Access::Allowed | Access::Unsure => waiters.push(job),
                    }
                }
                // Then what the scan runs: a user who may flush but not scan or delete gets
                // the refusal of what it may not run.
                if let Some(Access::Denied(e)) =
                    access[3..].iter().find(|a| matches!(a, Access::Denied(_)))
                {
                    return self.end_all(waiters, Outcome::Redis(e.clone()));
                }
                checked = true;
                continue;
            }
            if !counted {
                counted = true;
                counter!("stormwall_scoped_flushes_executed_total").increment(1);
            }
            let (keys_budget, commands_budget) = shared.budgets();
            let chunk = found
                .len()
                .min(inv.max_batch_keys)
                .min(keys_budget.burst as usize);
            if let Err(at) = take(
                &shared,
                (&*keys_budget, &*commands_budget),
                Units::new(chunk as u64, 1),
                &mut paid,
                deadline - margin,
            )
            .await
            {
                expire_before(&mut waiters, at + margin, || self.cut_short(max_wait));
                continue;
            }
            // Waiting for budget took time: a client that left meanwhile is not deleted for.
            if waiters.iter().any(|j| j.abandoned()) {
                continue;
            }
            let command = if chunk > 0 {
                let mut c = Vec::with_capacity(chunk + 1);
                c.push(Bytes::from_static(delete));
                c.extend(found[..chunk].iter().cloned());
                counter!("stormwall_invalidation_commands_sent_total").increment(1);
                c
            } else {
                counter!("stormwall_scoped_flush_scan_calls_total").increment(1);
                scan_command(self.pattern, &cursor, SCAN_COUNT)
            };
            let reply = match self.exec.send(&[command], deadline).await {
                // Not sent: plan again on a new connection.
                Err(_) => continue,
                Ok(Err(_lost)) => {
                    // Start over: what the lost command did is unknown, the result is not.
                    self.deleted_any |= chunk > 0;
                    (cursor, done, paid) = (Bytes::from_static(b"0"), false, Units::default());
                    found.clear();
                    continue;
                }
                Ok(Ok(mut replies)) => replies.pop(),
            };
            paid = Units::default();
            match reply {
                Some(OwnedFrame::Integer(n)) if chunk > 0 => {
                    self.deleted_any = true;
                    removed += n.max(0) as u64;
                    counter!("stormwall_scoped_flush_keys_deleted_total")
                        .increment(n.max(0) as u64);
                    found.drain(..chunk);
                }
                Some(OwnedFrame::Array(parts)) if chunk == 0 => match scan_reply(parts) {
                    Some((next, keys)) => {
                        done = next.as_ref() == b"0";
                        cursor = next;
                        found = keys;
                    }
                    None => {
                        self.exec.discard();
                        return self.end_all(waiters, Outcome::Unknown);
                    }
                },
                // Redis refused what the scan sent (`-BUSY` under a slow script, a key the
                // user may not delete, …): that answer, if nothing was deleted yet.
                Some(OwnedFrame::Error(e)) => return self.end_all(waiters, Outcome::Redis(e)),
                _ => {
                    self.exec.discard();
                    return self.end_all(waiters, Outcome::Unknown);
                }
            }
        }
    }
}

/// `SCAN cursor MATCH pattern COUNT count`.
fn scan_command(pattern: &Bytes, cursor: &Bytes, count: &'static [u8]) -> Vec<Bytes> {
    vec![
        Bytes::from_static(b"SCAN"),
        cursor.clone(),
        Bytes::from_static(b"MATCH"),
        pattern.clone(),
        Bytes::from_static(b"COUNT"),
        Bytes::from_static(count),
    ]
}

/// The next cursor and the keys of a `SCAN` reply.
fn scan_reply(parts: Vec<OwnedFrame>) -> Option<(Bytes, Vec<Bytes>)> {
    let mut parts = parts.into_iter();
    let cursor = match parts.next()? {
        OwnedFrame::BulkString(c) => Bytes::from(c),
        _ => return None,
    };
    let keys = match parts.next()? {
        OwnedFrame::Array(keys) => keys
            .into_iter()
            .map(|k| match k {
                OwnedFrame::BulkString(k) => Some(Bytes::from(k)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?,
        _ => return None,
    };
    Some((cursor, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_redis_does() {
        for (p, s, m) in [
            ("appA:*", "appA:1", true),
            ("appA:*", "appA:", true),
            ("appA:*", "appB:1", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[b-a]llo", "hallo", true),
            ("h\\*llo", "h*llo", true),
            ("h\\*llo", "hello", false),
            ("web-*", "web-7", true),
            ("web-*", "worker-7", false),
            (":1:*", ":1:views.decorators.cache", true),
        ] {
            assert_eq!(glob_match(p.as_bytes(), s.as_bytes()), m, "{p} ~ {s}");
        }
    }

    fn rule(name: Option<&str>, user: Option<&str>, db: Option<i64>, pattern: &str) -> FlushRule {
        FlushRule {
            client_name: name.map(Into::into),
            user: user.map(Into::into),
            db,
            pattern: pattern.into(),
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let rules = [
            rule(Some("appA*"), None, None, "appA:*"),
            rule(None, Some("billing"), None, "bill:*"),
            rule(None, None, Some(3), "*"),
        ];
        let default = Identity::default();
        let client = |identity, name: Option<&'static [u8]>| Client {
            identity,
            identity_known: true,
            name,
            name_known: true,
        };
        let pattern = |p: &'static str| Scope::Pattern(Bytes::from_static(p.as_bytes()));
        assert_eq!(
            scope_of(&rules, client(&default, Some(b"appA-web"))),
            pattern("appA:*")
        );
        assert_eq!(
            scope_of(&rules, client(&default, Some(b"appB"))),
            Scope::Whole
        );
        assert_eq!(scope_of(&rules, client(&default, None)), Scope::Whole);
        let billing = Identity {
            user: Some(Bytes::from_static(b"billing")),
            password: Some(Bytes::from_static(b"pw")),
            db: 3,
        };
        assert_eq!(scope_of(&rules, client(&billing, None)), pattern("bill:*"));
        let db3 = Identity {
            db: 3,
            ..Identity::default()
        };
        assert_eq!(scope_of(&rules, client(&db3, None)), pattern("*"));
        // A user rule for `default` matches a connection that never named a user.
        let by_default = [rule(None, Some("default"), None, "x:*")];
        assert_eq!(
            scope_of(&by_default, client(&default, None)),
            pattern("x:*")
        );
        // What is not known cannot be matched, and is not guessed.
        let unknown_name = Client {
            name_known: false,
            ..client(&default, Some(b"appA"))
        };
        assert_eq!(scope_of(&rules, unknown_name), Scope::Unknown);
        let unknown_identity = Client {
            identity_known: false,
            ..client(&default, Some(b"appB"))
        };
        assert_eq!(scope_of(&rules, unknown_identity), Scope::Unknown);
        assert_eq!(scope_of(&[], unknown_identity), Scope::Whole);
    }
}
