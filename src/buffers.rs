//! Read buffers lent to connections only while they have bytes to hold.
//!
//! An idle client must cost little (10,000 idle clients in a few tens of MiB): a session
//! that has consumed everything it read gives its buffer back, waits for the socket to
//! become readable, and borrows one again. Buffers are recycled through a per-thread free
//! list, so a busy connection that goes idle between every request pays no allocation.

use std::cell::RefCell;

use bytes::BytesMut;

/// Size of a lent buffer; buffers grow only for large frames.
pub(crate) const READ_BUF: usize = 16 * 1024;

/// Free buffers kept per thread; more are dropped.
const KEEP: usize = 256;
/// Buffers that grew past this (a large request or reply) are freed, not kept.
const MAX_KEPT_CAPACITY: usize = 4 * READ_BUF;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer with room for at least [`READ_BUF`] bytes.
pub(crate) fn take() -> BytesMut {
    FREE.with_borrow_mut(|free| free.pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_BUF))
}

/// Gives `buf` back if it holds nothing, leaving an unallocated buffer in its place.
pub(crate) fn give(buf: &mut BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    let mut old = std::mem::take(buf);
    if old.capacity() < READ_BUF {
        // A piece split off a larger buffer (a shared connection's replies): not worth
        // keeping, and reserving in it would allocate anyway.
        return;
    }
    old.clear();
    // Reclaims the space consumed at the front (the buffer is not shared once empty).
    old.reserve(READ_BUF);
    if old.capacity() <= MAX_KEPT_CAPACITY {
        FREE.with_borrow_mut(|free| {
            if free.len() < KEEP {
                free.push(old);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_buffers_are_recycled_and_full_ones_kept() {
        let mut buf = take();
        assert!(buf.capacity() >= READ_BUF);
        buf.extend_from_slice(b"pending");
        give(&mut buf);
        assert_eq!(
            &buf[..],
            b"pending",
            "a buffer holding bytes was taken away"
        );
        buf.clear();
        give(&mut buf);
        assert_eq!(buf.capacity(), 0);
        let again = take();
        assert!(again.capacity() >= READ_BUF);
    }
}
