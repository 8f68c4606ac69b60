//! A session's way to Redis: its own socket (dedicated mode, or a pinned shared client), or
//! a place on a shared connection.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tracing::debug;

use super::{MIN_READ, READ_BUF};
use crate::config::UpstreamConfig;
use crate::net::{ReadHalf, WriteHalf};
use crate::upstream::mux::{Inbox, Mux, Sent};
use crate::upstream::pool::{Group, Pools, Unavailable};

/// Where the request side writes.
pub(super) enum Upstream {
    /// A connection of the client's own.
    Socket(WriteHalf),
    Shared(SharedLink),
    /// Places on shared connections to each master of a Redis Cluster.
    Cluster(super::cluster::ClusterLink),
}

/// Where the reply side reads.
pub(super) enum Replies {
    Socket(ReadHalf),
    Shared(Arc<Inbox>),
}

impl Replies {
    /// Reads whatever Redis sent for this client into `buf`; `Ok(0)` at the end of a
    /// socket, an error once a shared connection failed with replies owed.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Replies::Socket(read) => {
                if buf.capacity() - buf.len() < MIN_READ {
                    buf.reserve(READ_BUF);
                }
                read.read_buf(buf).await
            }
            Replies::Shared(inbox) => inbox.read(buf).await,
        }
    }
}

impl Upstream {
    /// Half-closes a socket of the client's own (Redis then ends the connection, as it
    /// would for the client); a shared connection stays open.
    pub async fn shutdown(&mut self) {
        match self {
            Upstream::Socket(write) => {
                let _ = write.shutdown().await;
            }
            // Its private connection ends what it carried (a blocked command), as the
            // client's own would.
            Upstream::Cluster(link) => link.drop_private(),
            Upstream::Shared(_) => {}
        }
    }
}

/// A shared client's place in a group of shared connections.
pub(super) struct SharedLink {
    group: Arc<Group>,
    /// Which of the group's connections this client uses.
    slot: usize,
    mux: Option<Arc<Mux>>,
    pub inbox: Arc<Inbox>,
}

impl SharedLink {
    pub fn new(group: Arc<Group>, inbox: Arc<Inbox>) -> SharedLink {
        SharedLink {
            slot: group.assign(),
            group,
            mux: None,
            inbox,
        }
    }

    /// Moves to another group (the client's identity, database or protocol changed). Only
    /// called with nothing in flight, so order across the two connections is kept.
    pub fn rekey(&mut self, group: Arc<Group>) {
        if !Arc::ptr_eq(&group, &self.group) {
            self.slot = group.assign();
            self.group = group;
            self.mux = None;
        }
    }

    /// Resolves when the shared connection this client uses fails (connecting it first):
    /// Redis may have restarted, so what the client is waiting for may no longer apply.
    pub async fn lost(&mut self, pools: &Pools, cfg: &UpstreamConfig) {
        loop {
            // No connection to be had at all counts as lost.
            let Some(mux) = self.mux(pools, cfg).await else {
                return;
            };
            mux.lost().cancelled_owned().await;
            // A connection closed because the upstream moved is no loss: what the client
            // waits for applies to the new upstream, and its connection is the new one.
            if !mux.is_retired() {
                return;
            }
        }
    }

    /// Takes a spare on which Redis just accepted this client's new state as its shared
    /// connection, if the new group has none open yet.
    pub fn adopt(&self, conn: crate::upstream::Conn, cfg: &UpstreamConfig) {
        self.group.adopt(self.slot, conn, cfg);
    }

    /// The live shared connection, reconnecting if needed; `None` if this client's
    /// replies were lost with a failed connection, or Redis stays away.
    async fn mux(&mut self, pools: &Pools, cfg: &UpstreamConfig) -> Option<Arc<Mux>> {
        if let Some(mux) = self.mux.as_ref().filter(|m| !m.is_dead()) {
            // After the upstream moved, the old connection goes on carrying this client's
            // commands until the replies owed on it are in, so they stay in order.
            if cfg.target.is_current(mux.epoch()) || self.inbox.owed() > 0 {
                return Some(mux.clone());
            }
        }
        if self.inbox.owed() > 0 || self.inbox.failed() {
            return None;
        }
        match self.connect(pools, cfg).await {
            Ok(mux) => Some(mux),
            Err(Unavailable::Outage(e)) => {
                debug!(error = %e, "Redis did not come back within upstream.outage_wait; closing the client");
                None
            }
            Err(Unavailable::Refused(e)) => {
                debug!(error = %e, "Redis refuses this client's shared connection state; closing the client");
                None
            }
        }
    }

    /// Opens (or reopens) this client's connection in its group.
    async fn connect(
        &mut self,
        pools: &Pools,
        cfg: &UpstreamConfig,
    ) -> Result<Arc<Mux>, Unavailable> {
        // Boxed: the rare path (connecting) would otherwise size every session's future.
        let mux = Box::pin(self.group.connection(self.slot, pools, cfg)).await?;
        self.mux = Some(mux.clone());
        Ok(mux)
    }

    /// Sends `bytes`, `replies` commands whose replies stormwall reads itself, without
    /// waiting for them: they come through the returned receiver (dropped if the connection
    /// fails with them owed). A cluster client's commands travel this way, each node's
    /// replies resolved in the client's order by its reply side. An error means nothing
    /// was sent.
    pub async fn capture_later(
        &mut self,
        pools: &Pools,
        cfg: &UpstreamConfig,
        bytes: &[u8],
        replies: u32,
    ) -> Result<oneshot::Receiver<Vec<Bytes>>, Unavailable> {
        loop {
            let live = self.mux.as_ref().filter(|m| !m.is_dead()).cloned();
            let mux = match live {
                Some(mux) => mux,
                None => self.connect(pools, cfg).await?,
            };
            if let Some(rx) = mux.capture(bytes, replies) {
                return Ok(rx);
            }
            // It failed just now: the group opens another.
            self.mux = None;
        }
    }

    /// Closes the shared connection this client uses (its state is no longer the group's):
    /// clients with replies owed on it are closed, the rest get a new one.
    pub fn close_connection(&self) {
        if let Some(mux) = &self.mux {
            mux.close();
        }
    }

    /// Sends `bytes` at once if the client's connection is up and has room (the common
    /// case, with no future to set up). False if that needs waiting: use [`send`](Self::send).
    pub fn try_send(&self, cfg: &UpstreamConfig, bytes: &[u8], replies: u32) -> bool {
        self.mux.as_ref().is_some_and(|mux| {
            cfg.target.is_current(mux.epoch())
                && mux.send(&self.inbox, bytes, replies) == Sent::Queued
        })
    }

    /// Sends `bytes`, `replies` commands whose replies go to this client's inbox.
    pub async fn send(
        &mut self,
        pools: &Pools,
        cfg: &UpstreamConfig,
        bytes: &[u8],
        replies: u32,
    ) -> bool {
        loop {
            let Some(mux) = self.mux(pools, cfg).await else {
                return false;
            };
            match mux.send(&self.inbox, bytes, replies) {
                Sent::Queued => return true,
                Sent::Full => mux.room().await,
                // Lost meanwhile: `mux` reconnects, unless replies were lost with it.
                Sent::Dead => {}
            }
        }
    }

    /// Sends `bytes`, `replies` commands, in this client's order, and returns their replies
    /// to stormwall instead of the client.
    pub async fn capture(
        &mut self,
        pools: &Pools,
        cfg: &UpstreamConfig,
        bytes: &[u8],
        replies: u32,
    ) -> Option<Vec<Bytes>> {
        let rx = loop {
            let mux = self.mux(pools, cfg).await?;
            if let Some(rx) = mux.capture(bytes, replies) {
                break rx;
            }
        };
        rx.await.ok()
    }
}
