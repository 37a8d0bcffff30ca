//! Fencing of replication streams: at most one live stream per item at a receiver.
//!
//! When a sender reconnects (after a crash, a stall or a network cut) its old stream may
//! still be delivering buffered batches while the new one starts. Both number batches from the
//! same sequence space, so interleaving them would let a stale batch take the place of a new
//! one with the same number. A receiver opens every stream through [`Fence::open`]: the newest
//! stream of an item is current, and a batch of an older one is refused. The check and the
//! append happen under the item's lock, so no stale batch lands after a newer stream began.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The streams of every item at one receiver.
#[derive(Default)]
pub struct Fence {
    items: Mutex<HashMap<String, Arc<tokio::sync::Mutex<u64>>>>,
    next: AtomicU64,
}

/// One stream's ticket: hold [`Ticket::lock`] across check-and-append.
pub struct Ticket {
    current: Arc<tokio::sync::Mutex<u64>>,
    me: u64,
}

/// Held while a batch is appended; `None` from [`Ticket::lock`] means the stream is stale.
pub type Guard<'a> = tokio::sync::MutexGuard<'a, u64>;

impl Fence {
    /// Makes a new stream of `item` current. Returns its ticket and the lock guard, held so the
    /// caller can read the receiver's position before any other stream appends.
    pub async fn open(&self, item: &str) -> Ticket {
        let current = self
            .items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(item.to_string())
            .or_default()
            .clone();
        let me = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        *current.lock().await = me;
        Ticket { current, me }
    }
}

impl Ticket {
    /// The item's lock if this stream is still the current one.
    pub async fn lock(&self) -> Option<Guard<'_>> {
        let g = self.current.lock().await;
        (*g == self.me).then_some(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newer_stream_makes_older_stale() {
        let fence = Fence::default();
        let a = fence.open("vm1-1").await;
        assert!(a.lock().await.is_some());
        let b = fence.open("vm1-1").await;
        assert!(
            a.lock().await.is_none(),
            "the older stream must be fenced off"
        );
        assert!(b.lock().await.is_some());
        let other = fence.open("vm2-1").await;
        assert!(b.lock().await.is_some() && other.lock().await.is_some());
    }
}
