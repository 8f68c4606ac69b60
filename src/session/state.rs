//! Connection state as Redis confirmed it.
//!
//! A session must know a few things about its client's connection to govern invalidations
//! correctly: whether a transaction is open (then `DEL` is only queued), who the connection
//! is (the shield acts as that user, in that database), and whether it is authenticated.
//! Each of these changes only when Redis's *reply* says so — never on the client's request
//! alone: a `DISCARD x` that Redis refuses leaves the transaction open, an `AUTH` inside a
//! transaction is only `+QUEUED`, a `SELECT` Redis rejects selects nothing. The reply side
//! feeds every reply to a state-changing command through [`Confirmed::confirm`]; the request
//! side reads the result only once everything it sent before has been answered.
//!
//! What stormwall cannot model exactly (identity commands run by `EXEC`, a password it does
//! not keep, a `SELECT` argument it cannot read) makes the identity *unknown*: the session
//! then stops handing invalidations to the shield and sends them on the client's own
//! connection, where Redis applies them as the client — correct, just not coalesced.

use bytes::Bytes;

use crate::upstream::Identity;

/// Longest password the session keeps to act as its client on the shield's connections.
/// Longer ones (still valid for Redis) leave the identity unknown instead of holding large
/// buffers per queued `AUTH` (memory stays bounded in bytes, G6).
pub(super) const MAX_KEPT_PASSWORD: usize = 4096;

/// Credentials an `AUTH` or `HELLO … AUTH` asks for.
#[derive(Debug)]
pub(super) enum Login {
    /// `HELLO` without `AUTH`: no identity change.
    Unchanged,
    Known {
        user: Option<Bytes>,
        password: Bytes,
    },
    /// Valid for Redis but not kept by stormwall (see [`MAX_KEPT_PASSWORD`]).
    Untracked,
}

/// What `CLIENT SETNAME`/`SETINFO` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InfoField {
    Name,
    LibName,
    LibVer,
}

/// A command whose reply may change the connection state.
#[derive(Debug)]
pub(super) enum Effect {
    Multi,
    Exec,
    Discard,
    /// `RESET`; whether Redis required authentication when it was sent (a reset client is
    /// the default user again, authenticated only if that user needs no password).
    Reset {
        auth_required: bool,
    },
    /// `SELECT db`; `None` when stormwall cannot read the argument the way Redis did.
    Select(Option<i64>),
    /// `AUTH` (`hello == false`) or `HELLO` (`true`), with the protocol version and the
    /// name a `HELLO` asks for.
    Login {
        hello: bool,
        login: Login,
        proto: Option<u8>,
        name: Option<Bytes>,
    },
    /// `CLIENT SETNAME` or `CLIENT SETINFO LIB-NAME|LIB-VER`: the field and its value.
    ClientInfo(InfoField, Bytes),
    /// `CLIENT TRACKING ON|OFF`: whether it turns tracking on.
    Tracking(bool),
    /// A `PING` stormwall sent on the client's connection to learn whether Redis treats the
    /// connection as authenticated (its reply is not forwarded).
    AuthProbe,
    /// `WATCH` (a cluster client's, on its private connection to one master).
    Watch,
    /// `UNWATCH`.
    Unwatch,
}

impl Effect {
    /// Bytes this effect holds while it waits in the reply queue.
    pub(super) fn held_bytes(&self) -> usize {
        match self {
            Effect::Login { login, name, .. } => {
                let login = match login {
                    Login::Known { user, password } => {
                        password.len() + user.as_ref().map_or(0, |u| u.len())
                    }
                    _ => 0,
                };
                login + name.as_ref().map_or(0, |n| n.len())
            }
            Effect::ClientInfo(_, value) => value.len(),
            _ => 0,
        }
    }
}

/// The state Redis has confirmed for one client connection.
#[derive(Debug, Clone, Default)]
pub(super) struct Confirmed {
    pub identity: Identity,
    /// Inside `MULTI … EXEC`: Redis queues commands instead of running them.
    pub in_multi: bool,
    /// Keys are watched (`WATCH`) until `EXEC`, `DISCARD` or `UNWATCH`. Tracked for
    /// cluster clients, whose watches live on a private connection to one master.
    pub watching: bool,
    /// The credentials or the database changed in a way stormwall cannot reproduce.
    creds_unknown: bool,
    db_unknown: bool,
    /// Identity commands queued in the open transaction; they take effect if `EXEC` runs it.
    queued_login: bool,
    queued_select: bool,
    /// A name change queued in the open transaction (`CLIENT SETNAME`, `HELLO … SETNAME`),
    /// and whether one was run by `EXEC`: the name is then not known (`flush.rules` that
    /// match names cannot be decided).
    queued_name: bool,
    name_unknown: bool,
    /// Authenticated as Redis sees it, as best known: from the start when no password was
    /// required then, or by an accepted `AUTH`/`HELLO … AUTH`. Redis's pre-authentication
    /// limits apply to a client that is not, while Redis requires a password.
    pub authenticated: bool,
    /// Redis has *shown* that it treats this connection as authenticated: it accepted an
    /// `AUTH`, or ran a command that needs authentication. Only then may the shield act for
    /// the client: its own connections may have been authenticated before Redis started to
    /// require a password, when this client's was not.
    pub auth_proven: bool,
    /// Client tracking is on (or may be): Redis sends a tracking client the invalidation
    /// push for its own write together with the write's reply (or, with `NOLOOP`, none at
    /// all), and `CLIENT CACHING` applies to the connection's next command. A delete the
    /// shield runs elsewhere would break all three, so its invalidations run on its own
    /// connection.
    tracking: bool,
    /// The connection speaks RESP3 (a `HELLO 3` was accepted).
    pub resp3: bool,
    /// What `CLIENT SETNAME`, `HELLO … SETNAME` and `CLIENT SETINFO` set, replayed when a
    /// shared client moves to a connection of its own.
    pub name: Option<Bytes>,
    pub lib_name: Option<Bytes>,
    pub lib_ver: Option<Bytes>,
}

impl Confirmed {
    /// The state of a new connection.
    pub fn new(authenticated: bool) -> Confirmed {
        Confirmed {
            authenticated,
            ..Confirmed::default()
        }
    }

    /// Whether the shield can act as this connection (its user, password and database).
    pub fn identity_known(&self) -> bool {
        !self.creds_unknown && !self.db_unknown
    }

    /// Whether an invalidation may run on a connection other than the client's own (once
    /// Redis has shown the client is authenticated: [`Confirmed::auth_proven`]).
    pub fn may_delegate(&self) -> bool {
        !self.in_multi && self.identity_known() && !self.tracking
    }

    /// Whether [`name`](Self::name) is the name Redis has for the connection.
    pub fn name_known(&self) -> bool {
        !self.name_unknown
    }

    /// Applies `effect` as Redis's `reply` (one whole frame) decided it.
    pub fn confirm(&mut self, effect: Effect, reply: &[u8]) {
        let ok = reply == b"+OK\r\n";
        let queued = reply == b"+QUEUED\r\n";
        // Redis checks authentication before it runs (or queues) any of these, so a reply
        // other than an error shows the connection is authenticated; so does `NOPERM`, which
        // comes after that check. (`AUTH`, `HELLO` and `RESET` run unauthenticated.)
        let shows_auth = !matches!(effect, Effect::Reset { .. } | Effect::Login { .. })
            && (reply.first() != Some(&b'-') || reply.starts_with(b"-NOPERM"));
        self.auth_proven |= shows_auth;
        match effect {
            Effect::Multi => {
                if ok {
                    self.in_multi = true;
                    self.queued_login = false;
                    self.queued_select = false;
                }
            }
            Effect::Exec => {
                let error = reply.first() == Some(&b'-');
                // Redis ends the transaction when EXEC runs it (an array), when a WATCHed key
                // changed (a null), or when it was flagged at queue time (EXECABORT). Any
                // other error (wrong arity, no permission for EXEC) leaves it open.
                if self.in_multi && (!error || reply.starts_with(b"-EXECABORT")) {
                    let ran = !error && !is_null(reply);
                    self.creds_unknown |= ran && self.queued_login;
                    self.db_unknown |= ran && self.queued_select;
                    self.name_unknown |= ran && self.queued_name;
                    self.end_transaction();
                }
            }
            Effect::Discard => {
                if self.in_multi && ok {
                    self.end_transaction();
                }
            }
            Effect::Reset { auth_required } => {
                if reply == b"+RESET\r\n" {
                    *self = Confirmed::new(!auth_required);
                }
            }
            Effect::Select(db) => {
                if self.in_multi {
                    self.queued_select |= queued;
                } else if ok {
                    match db {
                        Some(db) => {
                            self.identity.db = db;
                            self.db_unknown = false;
                        }
                        None => self.db_unknown = true,
                    }
                }
            }
            Effect::Tracking(on) => {
                if self.in_multi {
                    // Run by EXEC or not: assume it may be on (the safe side).
                    self.tracking |= queued && on;
                } else if ok {
                    self.tracking = on;
                }
            }
            Effect::AuthProbe => {}
            Effect::Watch => {
                if !self.in_multi && ok {
                    self.watching = true;
                }
            }
            Effect::Unwatch => {
                if !self.in_multi && ok {
                    self.watching = false;
                }
            }
            Effect::ClientInfo(field, value) => {
                if self.in_multi {
                    self.queued_name |= queued && field == InfoField::Name;
                } else if ok {
                    self.name_unknown &= field != InfoField::Name;
                    let slot = match field {
                        InfoField::Name => &mut self.name,
                        InfoField::LibName => &mut self.lib_name,
                        InfoField::LibVer => &mut self.lib_ver,
                    };
                    // Redis clears a name set to the empty string.
                    *slot = (!value.is_empty()).then_some(value);
                }
            }
            Effect::Login {
                hello,
                login,
                proto,
                name,
            } => {
                if self.in_multi {
                    self.queued_login |= queued;
                    self.queued_name |= queued && name.is_some();
                    return;
                }
                let accepted = if hello {
                    matches!(reply.first(), Some(b'*' | b'%'))
                } else {
                    ok
                };
                if !accepted {
                    return;
                }
                if let Some(proto) = proto {
                    self.resp3 = proto == 3;
                }
                if name.is_some() {
                    self.name = name.filter(|n| !n.is_empty());
                    self.name_unknown = false;
                }
                match login {
                    Login::Unchanged => return,
                    Login::Known { user, password } => {
                        self.identity.user = user;
                        self.identity.password = Some(password);
                        self.creds_unknown = false;
                    }
                    Login::Untracked => self.creds_unknown = true,
                }
                self.authenticated = true;
                self.auth_proven = true;
            }
        }
    }

    /// The commands that put a fresh connection into this state (a shared client moving to a
    /// connection of its own), in the order Redis needs them.
    pub fn replay(&self) -> Vec<Vec<Bytes>> {
        let mut commands = self.identity.commands();
        if self.resp3 {
            commands.push(vec![Bytes::from_static(b"HELLO"), Bytes::from_static(b"3")]);
        }
        let client = |sub: &'static [u8], field: Option<&'static [u8]>, value: &Bytes| {
            let mut c = vec![Bytes::from_static(b"CLIENT"), Bytes::from_static(sub)];
            c.extend(field.map(Bytes::from_static));
            c.push(value.clone());
            c
        };
        if let Some(name) = &self.name {
            commands.push(client(b"SETNAME", None, name));
        }
        if let Some(lib) = &self.lib_name {
            commands.push(client(b"SETINFO", Some(b"LIB-NAME"), lib));
        }
        if let Some(ver) = &self.lib_ver {
            commands.push(client(b"SETINFO", Some(b"LIB-VER"), ver));
        }
        commands
    }

    fn end_transaction(&mut self) {
        self.in_multi = false;
        self.watching = false;
        self.queued_login = false;
        self.queued_select = false;
        self.queued_name = false;
    }
}

/// A RESP2 or RESP3 null (`*-1`, `$-1`, `_`).
fn is_null(reply: &[u8]) -> bool {
    matches!(reply, b"*-1\r\n" | b"$-1\r\n" | b"_\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(password: &str) -> Login {
        Login::Known {
            user: None,
            password: Bytes::from(password.to_owned()),
        }
    }

    fn auth(password: &str) -> Effect {
        Effect::Login {
            hello: false,
            login: known(password),
            proto: None,
            name: None,
        }
    }

    #[test]
    fn transactions_end_only_when_redis_says_so() {
        let mut s = Confirmed::default();
        s.confirm(Effect::Multi, b"+OK\r\n");
        assert!(s.in_multi);
        s.confirm(
            Effect::Discard,
            b"-ERR wrong number of arguments for 'discard' command\r\n",
        );
        assert!(s.in_multi, "a refused DISCARD ended the transaction");
        s.confirm(
            Effect::Reset {
                auth_required: false,
            },
            b"-ERR wrong number of arguments\r\n",
        );
        assert!(s.in_multi, "a refused RESET ended the transaction");
        s.confirm(Effect::Exec, b"-NOPERM no permissions to run 'exec'\r\n");
        assert!(s.in_multi, "a refused EXEC ended the transaction");
        s.confirm(Effect::Exec, b"-EXECABORT Transaction discarded\r\n");
        assert!(!s.in_multi);
        s.confirm(Effect::Multi, b"+OK\r\n");
        s.confirm(Effect::Discard, b"+OK\r\n");
        assert!(!s.in_multi);
        s.confirm(Effect::Multi, b"-ERR MULTI calls can not be nested\r\n");
        assert!(!s.in_multi);
    }

    #[test]
    fn queued_identity_commands_are_not_adopted() {
        let mut s = Confirmed::default();
        s.confirm(Effect::Multi, b"+OK\r\n");
        s.confirm(auth("pw"), b"+QUEUED\r\n");
        s.confirm(Effect::Select(Some(5)), b"+QUEUED\r\n");
        assert_eq!(s.identity, Identity::default());
        s.confirm(Effect::Discard, b"+OK\r\n");
        assert_eq!(s.identity, Identity::default());
        assert!(s.identity_known());
        // Run by EXEC: their effect is real but not modelled, so the identity is unknown.
        s.confirm(Effect::Multi, b"+OK\r\n");
        s.confirm(Effect::Select(Some(5)), b"+QUEUED\r\n");
        s.confirm(Effect::Exec, b"*1\r\n+OK\r\n");
        assert!(!s.identity_known());
        s.confirm(Effect::Select(Some(2)), b"+OK\r\n");
        assert!(s.identity_known());
        assert_eq!(s.identity.db, 2);
        // A transaction a WATCH aborted ran nothing.
        s.confirm(Effect::Multi, b"+OK\r\n");
        s.confirm(auth("x"), b"+QUEUED\r\n");
        s.confirm(Effect::Exec, b"*-1\r\n");
        assert!(s.identity_known());
    }

    #[test]
    fn a_name_set_by_exec_is_unknown_until_set_again() {
        let name = |n: &str| Effect::ClientInfo(InfoField::Name, Bytes::from(n.to_owned()));
        let mut s = Confirmed::default();
        s.confirm(name("appA"), b"+OK\r\n");
        assert_eq!(s.name.as_deref(), Some(&b"appA"[..]));
        assert!(s.name_known());
        s.confirm(Effect::Multi, b"+OK\r\n");
        s.confirm(name("appB"), b"+QUEUED\r\n");
        s.confirm(Effect::Discard, b"+OK\r\n");
        assert!(s.name_known(), "a discarded SETNAME changed nothing");
        s.confirm(Effect::Multi, b"+OK\r\n");
        s.confirm(name("appB"), b"+QUEUED\r\n");
        s.confirm(Effect::Exec, b"*1\r\n+OK\r\n");
        assert!(!s.name_known());
        assert!(s.identity_known(), "only the name is unknown");
        s.confirm(name("appC"), b"-ERR Client names cannot contain spaces\r\n");
        assert!(!s.name_known());
        s.confirm(name("appC"), b"+OK\r\n");
        assert!(s.name_known());
        assert_eq!(s.name.as_deref(), Some(&b"appC"[..]));
    }

    #[test]
    fn tracking_keeps_invalidations_on_the_own_connection() {
        let mut s = Confirmed::default();
        s.confirm(Effect::Tracking(true), b"-ERR syntax error\r\n");
        assert!(s.may_delegate());
        s.confirm(Effect::Tracking(true), b"+OK\r\n");
        assert!(!s.may_delegate());
        s.confirm(Effect::Tracking(false), b"+OK\r\n");
        assert!(s.may_delegate());
    }

    #[test]
    fn authentication_is_proven_by_what_redis_runs() {
        let mut s = Confirmed::new(true);
        assert!(!s.auth_proven, "assumed, not shown");
        s.confirm(Effect::AuthProbe, b"-NOAUTH Authentication required.\r\n");
        s.confirm(
            Effect::Select(Some(1)),
            b"-ERR wrong number of arguments\r\n",
        );
        s.confirm(
            Effect::Login {
                hello: true,
                login: Login::Unchanged,
                proto: None,
                name: None,
            },
            b"%7\r\n",
        );
        assert!(!s.auth_proven);
        s.confirm(Effect::AuthProbe, b"+PONG\r\n");
        assert!(s.auth_proven);
        s.confirm(
            Effect::Reset {
                auth_required: true,
            },
            b"+RESET\r\n",
        );
        assert!(!s.auth_proven);
        s.confirm(auth("pw"), b"+OK\r\n");
        assert!(s.auth_proven);
    }

    #[test]
    fn identity_changes_on_acceptance_only() {
        let mut s = Confirmed::default();
        s.confirm(
            auth("bad"),
            b"-WRONGPASS invalid username-password pair\r\n",
        );
        assert_eq!(s.identity.password, None);
        s.confirm(auth("good"), b"+OK\r\n");
        assert_eq!(s.identity.password.as_deref(), Some(&b"good"[..]));
        s.confirm(
            Effect::Login {
                hello: true,
                login: known("h"),
                proto: None,
                name: None,
            },
            b"-NOPROTO unsupported protocol version\r\n",
        );
        assert_eq!(s.identity.password.as_deref(), Some(&b"good"[..]));
        s.confirm(
            Effect::Login {
                hello: true,
                login: known("h"),
                proto: None,
                name: None,
            },
            b"%7\r\n",
        );
        assert_eq!(s.identity.password.as_deref(), Some(&b"h"[..]));
        s.confirm(
            Effect::Login {
                hello: false,
                login: Login::Untracked,
                proto: None,
                name: None,
            },
            b"+OK\r\n",
        );
        assert!(!s.identity_known());
        s.confirm(Effect::Select(None), b"-ERR DB index is out of range\r\n");
        assert!(s.authenticated);
        s.confirm(
            Effect::Reset {
                auth_required: true,
            },
            b"+RESET\r\n",
        );
        assert!(s.identity_known());
        assert!(!s.authenticated);
        assert_eq!(s.identity, Identity::default());
    }
}
