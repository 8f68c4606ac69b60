//! Where Redis is right now, and when that changed.
//!
//! The address every connection to Redis goes to is not fixed for the process's life: a
//! reload may change `upstream.address`, and with `upstream.kind = "sentinel"` it is the
//! master Sentinel names, which moves at a failover. A [`Target`] holds the current address
//! (with the TLS settings that go with it) and an *epoch* that counts its changes.
//!
//! Every connection records the epoch it was opened in. One opened in an older epoch is to
//! the old Redis, and whoever holds it moves on as soon as it safely can: the shield's, the
//! probe's and the spares at their next use, a shared connection once no client has replies
//! owed on it, and a client's private connection (dedicated mode, a pin) is closed — its
//! state (a transaction, subscriptions, a selected database) lived on the old server, as
//! it would be for a client that had been connected to that server directly.
//!
//! One `Target` lives for the whole process: a reloaded configuration carries the running
//! one over ([`crate::config::Config::with_live_changes_from`]).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use metrics::counter;
use tokio::sync::watch;
use tracing::info;

use crate::config::{UpstreamConfig, UpstreamKind};
use crate::net::Addr;
use crate::tls::{ClientSide, Loaded};

/// Why the address changed; the `cause` label of `stormwall_upstream_moves_total`.
#[derive(Debug, Clone, Copy)]
pub enum Cause {
    /// A reload changed `upstream.address`.
    Reload,
    /// Sentinel named another master.
    Sentinel,
    /// A Redis Cluster's slot map named another master for slot 0 (see [`Target::cluster_node`]).
    Cluster,
}

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Cause::Reload => "reload",
            Cause::Sentinel => "sentinel",
            Cause::Cluster => "cluster",
        }
    }
}

/// Where connections to Redis go: the address and the TLS settings for it.
#[derive(Clone)]
pub struct Located {
    pub epoch: u64,
    pub address: Addr,
    pub tls: Loaded<ClientSide>,
}

struct Current {
    epoch: u64,
    /// `None` until known: a Sentinel-managed master before a sentinel named it.
    address: Option<Addr>,
    tls: Loaded<ClientSide>,
}

/// The current upstream address and its epoch (see the module doc).
pub struct Target {
    current: Mutex<Current>,
    /// `current.epoch`, readable without the lock: every shared write checks it.
    epoch: AtomicU64,
    /// The epoch, for sessions that wait for a move.
    moved: watch::Sender<u64>,
}

impl Default for Target {
    fn default() -> Self {
        Target {
            current: Mutex::new(Current {
                epoch: 0,
                address: None,
                tls: Loaded::default(),
            }),
            epoch: AtomicU64::new(0),
            moved: watch::Sender::new(0),
        }
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.lock();
        f.debug_struct("Target")
            .field("epoch", &current.epoch)
            .field("address", &current.address)
            .finish()
    }
}

/// Runtime state, not a setting: two configurations never differ by it.
impl PartialEq for Target {
    fn eq(&self, _: &Target) -> bool {
        true
    }
}

impl Target {
    fn lock(&self) -> MutexGuard<'_, Current> {
        // Nothing panics while holding it, and the state stays consistent if it did.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a new connection goes now. A standalone upstream nobody has [`follow`]ed yet
    /// (a configuration that was never started: `--check-config`, unit tests) is at its
    /// configured address.
    ///
    /// [`follow`]: Self::follow
    pub fn locate(&self, cfg: &UpstreamConfig) -> io::Result<Located> {
        let current = self.lock();
        match &current.address {
            Some(address) => Ok(Located {
                epoch: current.epoch,
                address: address.clone(),
                tls: current.tls.clone(),
            }),
            None if cfg.kind == UpstreamKind::Standalone => Ok(Located {
                epoch: current.epoch,
                address: cfg.address.clone(),
                tls: cfg.tls.loaded.clone(),
            }),
            None if cfg.kind == UpstreamKind::Cluster => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no cluster node has given the slot map yet",
            )),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "no Sentinel has named the master `{}` yet",
                    cfg.master_name.as_deref().unwrap_or("")
                ),
            )),
        }
    }

    /// The current epoch: a connection opened in an older one is to a Redis that is no
    /// longer the upstream.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether a connection opened in `epoch` still goes to the upstream.
    pub fn is_current(&self, epoch: u64) -> bool {
        self.epoch() == epoch
    }

    /// Takes a (re)loaded configuration's standalone address and TLS settings: a changed
    /// address starts a new epoch. A Sentinel upstream's address comes from [`moved_to`].
    ///
    /// [`moved_to`]: Self::moved_to
    pub fn follow(&self, cfg: &UpstreamConfig) {
        if cfg.kind != UpstreamKind::Standalone {
            // The TLS settings still follow the file (certificates rotate).
            self.lock().tls = cfg.tls.loaded.clone();
            return;
        }
        self.set(cfg.address.clone(), cfg.tls.loaded.clone(), Cause::Reload);
    }

    /// Sentinel named `address` as the master.
    pub fn moved_to(&self, address: Addr, cfg: &UpstreamConfig) {
        self.set(address, cfg.tls.loaded.clone(), Cause::Sentinel);
    }

    /// A Redis Cluster upstream: `address` is the master serving slot 0 now. Connections
    /// that are about the cluster as a whole rather than a key (the readiness probe, the
    /// spares an `AUTH` is checked on) go there; commands go to each slot's master through
    /// [`crate::cluster::router`], which has a target of its own per node.
    pub fn cluster_node(&self, address: Addr, cfg: &UpstreamConfig) {
        self.set(address, cfg.tls.loaded.clone(), Cause::Cluster);
    }

    fn set(&self, address: Addr, tls: Loaded<ClientSide>, cause: Cause) {
        let mut current = self.lock();
        current.tls = tls;
        if current.address.as_ref() == Some(&address) {
            return;
        }
        let first = current.address.is_none();
        let from = current.address.replace(address.clone());
        if first && matches!(cause, Cause::Reload) {
            // The address the process started with: nothing moved.
            return;
        }
        current.epoch += 1;
        let epoch = current.epoch;
        self.epoch.store(epoch, Ordering::Release);
        drop(current);
        match from {
            Some(from) => {
                counter!("stormwall_upstream_moves_total", "cause" => cause.label()).increment(1);
                info!(
                    from = %from, to = %address, cause = cause.label(),
                    "upstream Redis moved; connections follow (private ones are closed)"
                );
            }
            None => info!(to = %address, cause = cause.label(), "upstream Redis located"),
        }
        self.moved.send_replace(epoch);
    }

    /// Notified at every move, with the new epoch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.moved.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standalone(addr: &str) -> UpstreamConfig {
        UpstreamConfig {
            address: Addr::Tcp(addr.into()),
            ..UpstreamConfig::default()
        }
    }

    #[test]
    fn a_changed_address_starts_a_new_epoch() {
        let target = Target::default();
        let a = standalone("127.0.0.1:7001");
        assert_eq!(target.locate(&a).unwrap().address, a.address);
        target.follow(&a);
        let start = target.epoch();
        target.follow(&a);
        assert!(target.is_current(start), "the same address is no move");
        let b = standalone("127.0.0.1:7002");
        target.follow(&b);
        assert!(!target.is_current(start));
        // Even a configuration snapshot taken before the reload connects to the new address.
        let located = target.locate(&a).unwrap();
        assert_eq!(located.address, b.address);
        assert_eq!(located.epoch, target.epoch());
    }

    #[test]
    fn a_sentinel_master_is_unknown_until_named() {
        let target = Target::default();
        let cfg = UpstreamConfig {
            kind: UpstreamKind::Sentinel,
            master_name: Some("mymaster".into()),
            ..UpstreamConfig::default()
        };
        target.follow(&cfg);
        let error = target.locate(&cfg).err().expect("no master yet");
        assert!(error.to_string().contains("mymaster"), "{error}");
        let moves = target.subscribe();
        target.moved_to(Addr::Tcp("127.0.0.1:7003".into()), &cfg);
        assert!(moves.has_changed().unwrap());
        assert_eq!(
            target.locate(&cfg).unwrap().address,
            Addr::Tcp("127.0.0.1:7003".into())
        );
    }
}
