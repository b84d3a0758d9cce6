//! What the device served, for the control channel's `stats` and the exit log line.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every queue pair's worker.
#[derive(Debug, Default)]
pub struct Stats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Of `tx_packets`, those written to the tap in batches of more than one (one
    /// `io_uring_enter` a batch, `crate::writebatch`).
    pub tx_batched: AtomicU64,
    /// Frames from the tap the guest could not take (too large for its buffers, bad buffers).
    pub rx_dropped: AtomicU64,
    /// Frames from the guest the tap refused, or malformed chains.
    pub tx_dropped: AtomicU64,
    /// Frames from the guest sent corrupted by an injected `corrupt=N`.
    pub tx_corrupted: AtomicU64,
    /// Times a direction was throttled by its rate limiter.
    pub rx_throttled: AtomicU64,
    pub tx_throttled: AtomicU64,
    /// Descriptor chains refused as malformed (any queue).
    pub bad_chains: AtomicU64,
    /// Control queue commands served.
    pub ctrl_commands: AtomicU64,
    /// Times a queue was stopped for breaking the ring protocol, until its reset.
    pub broken_queues: AtomicU64,
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "rx_packets={} rx_bytes={} tx_packets={} tx_bytes={} tx_batched={} rx_dropped={} tx_dropped={} tx_corrupted={} rx_throttled={} tx_throttled={} bad_chains={} ctrl_commands={} broken_queues={}",
            get(&self.rx_packets),
            get(&self.rx_bytes),
            get(&self.tx_packets),
            get(&self.tx_bytes),
            get(&self.tx_batched),
            get(&self.rx_dropped),
            get(&self.tx_dropped),
            get(&self.tx_corrupted),
            get(&self.rx_throttled),
            get(&self.tx_throttled),
            get(&self.bad_chains),
            get(&self.ctrl_commands),
            get(&self.broken_queues),
        )
    }
}
