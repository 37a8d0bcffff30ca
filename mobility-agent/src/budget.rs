//! The host-wide replication memory budget: the bytes all machines of a host may hold in their
//! replication logs and unacknowledged batches together (`replication_budget`), on top of each
//! machine's own `replication_buffer`. 200 machines at 256 MiB each would be 50 GiB; the
//! budget bounds the host as a whole. When it is used up, writers wait (the guests are
//! throttled, as a filter driver does when its memory is exhausted) and their items say so;
//! nothing is dropped. A machine with nothing buffered may always write, so no machine is
//! starved by the others.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// What held a machine's writes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// The machine's own `replication_buffer` is full.
    MachineBuffer,
    /// The host's `replication_budget` is used up.
    HostBudget,
}

/// Bytes held by all machines of a host against a cap.
#[derive(Debug)]
pub struct HostBudget {
    cap: u64,
    used: AtomicU64,
    /// Signalled whenever bytes are given back.
    pub freed: Notify,
}

impl HostBudget {
    /// A budget of `cap` bytes.
    pub fn new(cap: u64) -> Self {
        HostBudget {
            cap,
            used: AtomicU64::new(0),
            freed: Notify::new(),
        }
    }

    /// No bound (tests, tools).
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether a machine that already holds bytes must wait.
    pub fn exhausted(&self) -> bool {
        self.used() >= self.cap
    }

    /// Records `bytes` more held.
    pub fn take(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives `bytes` back and wakes the waiting writers.
    pub fn give(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
        self.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_bytes_count_until_given_back() {
        let b = HostBudget::new(100);
        b.take(60);
        assert!(!b.exhausted());
        b.take(40);
        assert!(b.exhausted());
        b.give(50);
        assert_eq!(b.used(), 50);
        assert!(!b.exhausted());
        b.give(500);
        assert_eq!(b.used(), 0, "never below zero");
    }
}
