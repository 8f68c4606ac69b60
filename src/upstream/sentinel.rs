//! Following a Sentinel-managed master (`upstream.kind = "sentinel"`).
//!
//! As Redis's guidelines for Sentinel clients say: ask the Sentinels in turn for the
//! master's address (`SENTINEL GET-MASTER-ADDR-BY-NAME`), and check with `ROLE` on that
//! address that it is a master (a Sentinel that has not seen a failover yet names the old
//! one, now a replica) before any write goes there. Then listen on a Sentinel for
//! `+switch-master` and ask again at once when it comes — and every [`REFRESH`] anyway, in
//! case the message was missed (a Sentinel restarting, a partition).
//!
//! What is found goes to the upstream [`Target`](super::Target): a new master starts a new
//! epoch, shared connections move over and private ones are closed.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use metrics::counter;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Conn;
use crate::config::{Config, UpstreamConfig};
use crate::net::Addr;

/// How often the master is looked up again without a `+switch-master` message.
pub const REFRESH: Duration = Duration::from_secs(1);
/// The pause before asking again after no Sentinel named a usable master.
const RETRY: Duration = Duration::from_millis(250);

/// Looks the master up and follows it until `stop`. `config` gives the live configuration
/// (a reload may change the Sentinels or the master's name).
pub async fn follow(config: impl Fn() -> Arc<Config>, stop: CancellationToken) {
    let mut failing = false;
    // The subscribed connection, and the Sentinel it is to.
    let mut listening: Option<(String, Conn)> = None;
    loop {
        let cfg = config();
        let up = &cfg.upstream;
        let pause = match locate(up).await {
            Ok((master, sentinel)) => {
                counter!("stormwall_sentinel_lookups_total", "result" => "ok").increment(1);
                if failing {
                    info!(master = %master, "Sentinel names a master again");
                    failing = false;
                }
                up.target.moved_to(master, up);
                if listening
                    .as_ref()
                    .is_none_or(|(at, _)| !up.sentinels.contains(at))
                {
                    listening = subscribe(up, &sentinel).await.ok().map(|c| (sentinel, c));
                }
                REFRESH
            }
            Err(e) => {
                counter!("stormwall_sentinel_lookups_total", "result" => "failed").increment(1);
                if !failing {
                    warn!(error = %e, "no Sentinel names a usable master; clients wait, then get errors, until one does");
                    failing = true;
                }
                RETRY
            }
        };
        let name = up.master_name.clone().unwrap_or_default();
        let switched = async {
            match listening.as_mut() {
                Some((_, conn)) => switch_message(conn, &name).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            heard = switched => match heard {
                Ok(to) => debug!(to, "Sentinel announced +switch-master"),
                Err(e) => {
                    debug!(error = %e, "lost the Sentinel subscription; subscribing again");
                    listening = None;
                }
            },
        }
    }
}

/// Asks the Sentinels in order; the first to name a master that confirms it is one wins.
/// Returns the master and the Sentinel that named it.
pub async fn locate(up: &UpstreamConfig) -> Result<(Addr, String), String> {
    let mut problems = Vec::new();
    for sentinel in &up.sentinels {
        let checked = async {
            let master = ask(up, sentinel).await?;
            is_master(up, &master)
                .await
                .map_err(|e| format!("it named {master}, which {e}"))?;
            Ok::<_, String>(master)
        };
        match checked.await {
            Ok(master) => return Ok((master, sentinel.clone())),
            Err(e) => problems.push(format!("Sentinel {sentinel}: {e}")),
        }
    }
    Err(problems.join("; "))
}

/// A connection to a Sentinel, authenticated if `upstream.sentinel_password_file` is set.
async fn connect(up: &UpstreamConfig, sentinel: &str) -> Result<Conn, String> {
    let addr: Addr = sentinel.parse()?;
    let mut conn = Conn::connect_to(&addr, up)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    if let Some(file) = &up.sentinel_password_file {
        let password = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let mut auth = vec![Bytes::from_static(b"AUTH")];
        auth.extend(up.sentinel_user.clone().map(Bytes::from));
        auth.push(Bytes::from(
            password.trim_end_matches(['\r', '\n']).to_owned(),
        ));
        let deadline = Instant::now() + up.connect_timeout;
        if let OwnedFrame::Error(e) = call(&mut conn, auth, deadline).await? {
            return Err(format!("refused the login: {e}"));
        }
    }
    Ok(conn)
}

async fn call(
    conn: &mut Conn,
    command: Vec<Bytes>,
    deadline: Instant,
) -> Result<OwnedFrame, String> {
    conn.call_until(&[command], deadline)
        .await
        .map_err(|e| e.to_string())?
        .pop()
        .ok_or_else(|| "no reply".to_owned())
}

/// The master's address as `sentinel` knows it.
async fn ask(up: &UpstreamConfig, sentinel: &str) -> Result<Addr, String> {
    let mut conn = connect(up, sentinel).await?;
    let name = up.master_name.clone().unwrap_or_default();
    let query = vec![
        Bytes::from_static(b"SENTINEL"),
        Bytes::from_static(b"GET-MASTER-ADDR-BY-NAME"),
        Bytes::from(name.clone()),
    ];
    let deadline = Instant::now() + up.connect_timeout;
    match call(&mut conn, query, deadline).await? {
        OwnedFrame::Array(parts) if parts.len() == 2 => {
            let text = |f: &OwnedFrame| match f {
                OwnedFrame::BulkString(b) => String::from_utf8(b.clone()).ok(),
                _ => None,
            };
            match (text(&parts[0]), text(&parts[1])) {
                (Some(host), Some(port)) if port.parse::<u16>().is_ok() => {
                    Ok(Addr::Tcp(host_port(&host, &port)))
                }
                _ => Err("answered with an address that is not ip and port".into()),
            }
        }
        OwnedFrame::Null => Err(format!("does not monitor a master named `{name}`")),
        OwnedFrame::Error(e) => Err(e),
        _ => Err("answered something other than an address".into()),
    }
}

/// `host:port`, with an IPv6 address in brackets.
pub(crate) fn host_port(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Whether the server at `master` says it is a master (`ROLE`). A server that lets no
/// unauthenticated connection run `ROLE` cannot be asked; the Sentinel's word then stands
/// (and every shared connection checks `ROLE` again once authenticated).
async fn is_master(up: &UpstreamConfig, master: &Addr) -> Result<(), String> {
    let mut conn = Conn::connect_to(master, up)
        .await
        .map_err(|e| format!("cannot be reached: {e}"))?;
    let deadline = Instant::now() + up.connect_timeout;
    let reply = call(&mut conn, vec![Bytes::from_static(b"ROLE")], deadline).await?;
    match role(&reply) {
        Role::Master => Ok(()),
        Role::Other(role) => Err(format!("says it is a {role}")),
        Role::Unknown(why) => {
            debug!(master = %master, why, "cannot check the master's ROLE before authenticating");
            Ok(())
        }
    }
}

/// What a `ROLE` reply says.
#[derive(Debug, PartialEq)]
pub enum Role {
    Master,
    /// `slave`, `sentinel`, or anything else.
    Other(String),
    /// Not an answer to the question: an error (`NOAUTH`, `NOPERM`, `LOADING`).
    Unknown(String),
}

/// Reads a `ROLE` reply (RESP2 or RESP3, as raw frames or decoded).
pub fn role(reply: &OwnedFrame) -> Role {
    match reply {
        OwnedFrame::Array(parts) => match parts.first() {
            Some(OwnedFrame::BulkString(r)) if r == b"master" => Role::Master,
            Some(OwnedFrame::BulkString(r)) => Role::Other(String::from_utf8_lossy(r).into()),
            _ => Role::Other("server with an unreadable ROLE".into()),
        },
        OwnedFrame::Error(e) => Role::Unknown(e.clone()),
        _ => Role::Other("server with an unreadable ROLE".into()),
    }
}

/// Whether a raw `ROLE` reply (RESP2 or RESP3) says anything but `master`.
pub fn raw_role_is_not_master(reply: &[u8]) -> bool {
    // `*3\r\n$6\r\nmaster\r\n…`: the first element, after the array's header line.
    let Some(header) = memchr::memmem::find(reply, b"\r\n") else {
        return false;
    };
    reply.first() == Some(&b'*') && !reply[header + 2..].starts_with(b"$6\r\nmaster\r\n")
}

/// The error for a connection to a server that is not (or no longer) the master.
pub fn not_master(role: &str) -> io::Error {
    io::Error::other(format!(
        "the server Sentinel named says it is a {role}, not the master; waiting for Sentinel"
    ))
}

/// Subscribes to `+switch-master` on `sentinel`.
async fn subscribe(up: &UpstreamConfig, sentinel: &str) -> Result<Conn, String> {
    let mut conn = connect(up, sentinel).await?;
    let deadline = Instant::now() + up.connect_timeout;
    let subscribe = vec![
        Bytes::from_static(b"SUBSCRIBE"),
        Bytes::from_static(b"+switch-master"),
    ];
    match call(&mut conn, subscribe, deadline).await? {
        OwnedFrame::Error(e) => Err(e),
        _ => Ok(conn),
    }
}

/// Waits for a `+switch-master` message about master `name`; returns what it says.
async fn switch_message(conn: &mut Conn, name: &str) -> io::Result<String> {
    loop {
        let OwnedFrame::Array(parts) = conn.receive().await? else {
            continue;
        };
        // ["message", "+switch-master", "<name> <old ip> <old port> <new ip> <new port>"]
        if let Some(OwnedFrame::BulkString(text)) = parts.get(2) {
            let text = String::from_utf8_lossy(text);
            if text.split(' ').next() == Some(name) {
                return Ok(text.into_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_replies() {
        let bulk = |s: &str| OwnedFrame::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            role(&OwnedFrame::Array(vec![
                bulk("master"),
                OwnedFrame::Integer(0)
            ])),
            Role::Master
        );
        assert_eq!(
            role(&OwnedFrame::Array(vec![bulk("slave"), bulk("127.0.0.1")])),
            Role::Other("slave".into())
        );
        assert!(matches!(
            role(&OwnedFrame::Error("NOAUTH Authentication required.".into())),
            Role::Unknown(_)
        ));
    }

    #[test]
    fn raw_role_replies() {
        assert!(!raw_role_is_not_master(
            b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n"
        ));
        assert!(raw_role_is_not_master(
            b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:1\r\n"
        ));
        // An error is no answer: the connection's other replies decide.
        assert!(!raw_role_is_not_master(b"-NOPERM no\r\n"));
    }

    #[test]
    fn ipv6_addresses_get_brackets() {
        assert_eq!(host_port("::1", "6379"), "[::1]:6379");
        assert_eq!(host_port("10.0.0.1", "6379"), "10.0.0.1:6379");
    }
}
