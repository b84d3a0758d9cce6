//! bulkhead-block's side of in-flight I/O tracking (the layout and the protocol are the
//! runtime's: `bulkhead_device_runtime::inflight`). A queue's worker marks each request it takes
//! from the available ring, and each it completes around the used ring's update, so that a
//! process started in its place knows what was taken and not completed (docs/restart.md).
//!
//! The hooks in `queue.rs` are three calls: [`Tracker::taken`] when a request joins a batch,
//! [`Tracker::before_used`] and [`Tracker::after_used`] around its `add_used`.

use bulkhead_device_runtime::inflight::{self, InflightQueue};

/// One queue's tracker: a no-op until the frontend set an inflight region.
#[derive(Clone, Debug, Default)]
pub struct Tracker(Option<InflightQueue>);

impl Tracker {
    /// The tracker of queue `queue` in the region the frontend set, if any. Looked up once per
    /// event (the region changes only with SET_INFLIGHT_FD).
    pub fn for_queue(queue: usize) -> Tracker {
        Tracker(inflight::queue(queue))
    }

    /// `head` was taken from the available ring and joins the batch (an armed
    /// `crash_after` fault counts it, bulkhead_device_runtime::fault).
    pub fn taken(&self, head: u16) {
        if let Some(q) = &self.0 {
            q.taken(head);
        }
        bulkhead_device_runtime::fault::request_taken();
    }

    /// `head` is about to go into the used ring.
    pub fn before_used(&self, head: u16) {
        if let Some(q) = &self.0 {
            q.before_used(head);
        }
    }

    /// `head` is in the used ring, whose index is now `used_idx`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        if let Some(q) = &self.0 {
            q.after_used(head, used_idx);
        }
    }
}
