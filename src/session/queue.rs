//! The in-order queue from a session's request side to its reply side.
//!
//! Each entry says what the next reply (or replies) to the client will be. Consecutive runs
//! of plain forwarded commands merge into one entry while it waits, so a client that writes a
//! huge pipeline before reading anything (as `redis-py`'s `Pipeline.execute()` does) never
//! fills the queue: like Redis, stormwall keeps reading and lets Redis buffer the replies.
//! Only entries that cannot merge (local replies, identity changes) count against the bound,
//! and the bytes they hold (a kept password, a local reply) against a byte bound.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::state::Effect;
use crate::net::ReadHalf;

/// Unmergeable entries waiting before the request side pauses.
const MAX_ENTRIES: usize = 64 * 1024;
/// Bytes held by waiting entries (local replies, kept credentials) before the request side
/// pauses: what one client can make stormwall hold beyond its read buffers (G6).
const MAX_HELD_BYTES: usize = 1024 * 1024;

/// One instruction for the reply side, in request order.
#[derive(Debug)]
pub(super) enum Entry {
    /// The next `count` replies from Redis answer forwarded commands. `effect` (only with
    /// `count == 1`) is confirmed by that reply. `sent` is when the first of them went to
    /// Redis.
    Upstream {
        count: u32,
        blocking: bool,
        effect: Option<Effect>,
        sent: Instant,
    },
    /// A reply stormwall produced itself.
    Local(Bytes),
    /// The next reply from Redis answers a command stormwall substituted (a denied flush);
    /// the client gets these bytes instead.
    Replace(Bytes),
    /// The next reply from Redis answers stormwall's own authentication probe (a `PING`):
    /// it confirms [`Effect::AuthProbe`] and is not forwarded.
    Probe,
    /// From here on, Redis's bytes are relayed as they come (pub/sub, `MONITOR`, …).
    Raw,
    /// From here on, replies come from this connection of the client's own: a shared
    /// client moved to a private connection (everything before was answered).
    Switch(Private),
    /// A cluster client's commands sent to one or more masters: the reply side waits for
    /// their replies (following redirections) and merges them (`session::dispatch`).
    Cluster(Box<super::dispatch::Dispatch>),
}

/// The reading half of a shared client's new private connection.
pub(super) struct Private(pub ReadHalf);

impl std::fmt::Debug for Private {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Private")
    }
}

impl Entry {
    fn held_bytes(&self) -> usize {
        match self {
            Entry::Local(b) | Entry::Replace(b) => b.len(),
            Entry::Upstream {
                effect: Some(e), ..
            } => e.held_bytes(),
            _ => 0,
        }
    }
}

/// What [`ReplyQueue::try_pop`] found.
pub(super) enum Pop {
    Entry(Entry),
    Empty,
    /// Empty, and the request side will push nothing more.
    Finished,
}

#[derive(Default)]
struct Inner {
    entries: VecDeque<Entry>,
    /// The request side is done.
    finished: bool,
    /// The reply side is gone; pushes are pointless.
    abandoned: bool,
    /// Sum of [`Entry::held_bytes`] over `entries`.
    held: usize,
}

#[derive(Default)]
pub(super) struct ReplyQueue {
    inner: Mutex<Inner>,
    /// An entry was pushed, or the queue finished.
    pushed: Notify,
    /// Room was made.
    popped: Notify,
    /// Entries pushed and not yet fully answered.
    inflight: AtomicUsize,
    /// `inflight` dropped to zero.
    drained: Notify,
}

impl ReplyQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock, and the data stays consistent if it did.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an entry, merging plain runs. Waits while the queue is full. False if the
    /// reply side is gone.
    pub(super) async fn push(&self, entry: Entry) -> bool {
        let mut entry = Some(entry);
        loop {
            {
                let mut q = self.lock();
                if q.abandoned {
                    return false;
                }
                let Some(e) = entry.take() else { return true };
                if let (
                    Some(Entry::Upstream {
                        count,
                        blocking,
                        effect: None,
                        ..
                    }),
                    Entry::Upstream {
                        count: more,
                        blocking: more_blocking,
                        effect: None,
                        ..
                    },
                ) = (q.entries.back_mut(), &e)
                    && count.checked_add(*more).is_some()
                {
                    *count += *more;
                    *blocking |= *more_blocking;
                    return true;
                }
                let bytes = e.held_bytes();
                let room = q.entries.is_empty()
                    || (q.entries.len() < MAX_ENTRIES && q.held + bytes <= MAX_HELD_BYTES);
                if room {
                    if !matches!(e, Entry::Raw | Entry::Switch(_)) {
                        self.inflight.fetch_add(1, Ordering::AcqRel);
                    }
                    q.held += bytes;
                    q.entries.push_back(e);
                    drop(q);
                    self.pushed.notify_one();
                    return true;
                }
                entry = Some(e);
            }
            self.popped.notified().await;
        }
    }

    pub(super) fn try_pop(&self) -> Pop {
        let mut q = self.lock();
        match q.entries.pop_front() {
            Some(e) => {
                q.held -= e.held_bytes();
                drop(q);
                self.popped.notify_one();
                Pop::Entry(e)
            }
            None if q.finished => Pop::Finished,
            None => Pop::Empty,
        }
    }

    /// Resolves when something may have been pushed (or the queue finished).
    pub(super) async fn wait_pushed(&self) {
        self.pushed.notified().await
    }

    /// The request side will push nothing more.
    pub(super) fn finish(&self) {
        self.lock().finished = true;
        self.pushed.notify_one();
    }

    /// The reply side is gone: drops what is queued and returns it, so owed replies can be
    /// answered with an error.
    pub(super) fn abandon(&self) -> Vec<Entry> {
        let mut q = self.lock();
        q.abandoned = true;
        let left = q.entries.drain(..).collect();
        q.held = 0;
        drop(q);
        self.popped.notify_one();
        left
    }

    /// One popped entry fully answered.
    pub(super) fn answered(&self) {
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Lock-free when nobody waits: it only stores a permit.
            self.drained.notify_one();
        }
    }

    /// Whether every pushed entry has been answered.
    pub(super) fn is_drained(&self) -> bool {
        self.inflight.load(Ordering::Acquire) == 0
    }

    /// Waits until every pushed entry has been answered.
    pub(super) async fn drained(&self) {
        while !self.is_drained() {
            self.drained.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(count: u32) -> Entry {
        Entry::Upstream {
            count,
            blocking: false,
            effect: None,
            sent: Instant::now(),
        }
    }

    #[tokio::test]
    async fn plain_runs_merge_while_queued() {
        let q = ReplyQueue::default();
        for _ in 0..100_000 {
            assert!(q.push(plain(1)).await);
        }
        match q.try_pop() {
            Pop::Entry(Entry::Upstream { count, .. }) => assert_eq!(count, 100_000),
            _ => panic!("expected one merged entry"),
        }
        assert!(matches!(q.try_pop(), Pop::Empty));
        q.answered();
        assert!(q.is_drained());
    }

    #[tokio::test]
    async fn effects_and_local_replies_keep_their_place() {
        let q = ReplyQueue::default();
        q.push(plain(2)).await;
        q.push(Entry::Upstream {
            count: 1,
            blocking: false,
            effect: Some(Effect::Select(Some(1))),
            sent: Instant::now(),
        })
        .await;
        q.push(plain(3)).await;
        q.push(Entry::Local(Bytes::from_static(b":1\r\n"))).await;
        q.finish();
        let mut shapes = Vec::new();
        while let Pop::Entry(e) = q.try_pop() {
            shapes.push(match e {
                Entry::Upstream { count, effect, .. } => {
                    format!("{count}{}", if effect.is_some() { "e" } else { "" })
                }
                Entry::Local(_) => "L".into(),
                Entry::Replace(_)
                | Entry::Probe
                | Entry::Raw
                | Entry::Switch(_)
                | Entry::Cluster(_) => "other".into(),
            });
        }
        assert_eq!(shapes, ["2", "1e", "3", "L"]);
        assert!(matches!(q.try_pop(), Pop::Finished));
    }
}
