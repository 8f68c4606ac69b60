//! The replies with which a cluster node says "not here" or "not now" instead of running a
//! command.
//!
//! A node checks, before it runs anything, that it serves the slot of the command's keys
//! (`getNodeByQuery` in Redis's `cluster.c`). When it does not, the command was *not run*,
//! and the reply says what to do instead:
//!
//! * `-MOVED <slot> <host>:<port>`: that node serves the slot now (the map is stale);
//! * `-ASK <slot> <host>:<port>`: the slot is being migrated and the key is (or will be)
//!   there: send `ASKING` and then the command to that node, adjacent on one connection;
//! * `-TRYAGAIN …`: a multi-key command whose keys are split between the two ends of a
//!   migration, for now;
//! * `-CLUSTERDOWN …`: the cluster cannot serve the slot at the moment (a failover under
//!   way, a slot without a master).
//!
//! Those four are the only replies stormwall resends a command for: each of them certifies
//! that nothing ran. (A script that *returns* such an error after running is
//! indistinguishable; cluster clients have the same blind spot, see the README.)

use crate::net::Addr;
use crate::upstream::sentinel::host_port;

/// What a redirecting reply asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect<'a> {
    Moved { slot: u16, to: &'a str },
    Ask { slot: u16, to: &'a str },
    TryAgain,
    ClusterDown,
}

impl Redirect<'_> {
    /// The `kind` label of `stormwall_cluster_redirects_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Redirect::Moved { .. } => "moved",
            Redirect::Ask { .. } => "ask",
            Redirect::TryAgain => "tryagain",
            Redirect::ClusterDown => "clusterdown",
        }
    }
}

/// Reads a whole reply frame; `None` for every reply that is an answer.
pub fn parse(reply: &[u8]) -> Option<Redirect<'_>> {
    let line = reply.strip_prefix(b"-")?.strip_suffix(b"\r\n")?;
    if line.starts_with(b"TRYAGAIN") {
        return Some(Redirect::TryAgain);
    }
    if line.starts_with(b"CLUSTERDOWN") {
        return Some(Redirect::ClusterDown);
    }
    let (ask, rest) = if let Some(rest) = line.strip_prefix(b"MOVED ") {
        (false, rest)
    } else {
        (true, line.strip_prefix(b"ASK ")?)
    };
    let rest = std::str::from_utf8(rest).ok()?;
    let (slot, to) = rest.split_once(' ')?;
    let slot: u16 = slot.parse().ok()?;
    // `host:port`, `[v6]:port`, or `:port` when the node does not know its own address.
    let (_, port) = to.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    Some(if ask {
        Redirect::Ask { slot, to }
    } else {
        Redirect::Moved { slot, to }
    })
}

/// The node a `MOVED`/`ASK` names, as an address to connect to: a node that does not know
/// its own address (`:port`, `?:port`) is on the host of the node that answered.
pub fn target(to: &str, answered_by: &Addr) -> Addr {
    let (host, port) = to.rsplit_once(':').unwrap_or((to, ""));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if !host.is_empty() && host != "?" {
        return Addr::Tcp(host_port(host, port));
    }
    let from = answered_by.to_string();
    let from_host = from.rsplit_once(':').map_or(from.as_str(), |(h, _)| h);
    let from_host = from_host.trim_start_matches('[').trim_end_matches(']');
    Addr::Tcp(host_port(from_host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_are_read_and_answers_are_not() {
        assert_eq!(
            parse(b"-MOVED 12182 127.0.0.1:17003\r\n"),
            Some(Redirect::Moved {
                slot: 12182,
                to: "127.0.0.1:17003"
            })
        );
        assert_eq!(
            parse(b"-ASK 1 [::1]:7000\r\n"),
            Some(Redirect::Ask {
                slot: 1,
                to: "[::1]:7000"
            })
        );
        assert_eq!(
            parse(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"),
            Some(Redirect::TryAgain)
        );
        assert_eq!(
            parse(b"-CLUSTERDOWN Hash slot not served\r\n"),
            Some(Redirect::ClusterDown)
        );
        for answer in [
            &b"+OK\r\n"[..],
            b"$5\r\nMOVED\r\n",
            b"-ERR MOVED 1 a:1\r\n",
            b"-MOVED x 127.0.0.1:1\r\n",
            b"-MOVED 1\r\n",
            b"-MOVED 1 nowhere\r\n",
            b"-CROSSSLOT Keys in request don't hash to the same slot\r\n",
            b"-MOVED 1 a:1",
        ] {
            assert_eq!(parse(answer), None, "{}", String::from_utf8_lossy(answer));
        }
    }

    #[test]
    fn an_unknown_host_is_the_answering_nodes() {
        let from = Addr::Tcp("10.0.0.5:7000".into());
        assert_eq!(
            target("10.0.0.6:7001", &from),
            Addr::Tcp("10.0.0.6:7001".into())
        );
        assert_eq!(target(":7001", &from), Addr::Tcp("10.0.0.5:7001".into()));
        assert_eq!(target("?:7001", &from), Addr::Tcp("10.0.0.5:7001".into()));
        let v6 = Addr::Tcp("[::1]:7000".into());
        assert_eq!(target(":7002", &v6), Addr::Tcp("[::1]:7002".into()));
        assert_eq!(target("[::1]:7003", &v6), Addr::Tcp("[::1]:7003".into()));
    }
}
