//! One virtqueue's worth of request processing: take the available requests, run their disk
//! operations as one batch, then publish all the used entries together.
//!
//! Everything the guest controls is bounded here: a batch holds at most a queue's worth of
//! requests and at most [`BATCH_BYTES`] of data (a larger request runs in a batch of its own),
//! O_DIRECT bounce buffers of one batch never exceed [`BOUNCE_BUDGET`]; a request that does not
//! fit waits for the next batch, taken as soon as this one is published, in ring order. A queue
//! the guest broke (rings outside its memory, an available index more than a queue ahead) stops
//! being processed until the driver resets it. Log lines the guest can cause are rate-limited.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use bulkhead_device_runtime::loglimit::LogLimiter;

use bulkhead_device_runtime::iovec::{push_guest_iovecs, IovecError};
use bulkhead_device_runtime::rate::RateLimiter;
use log::warn;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::disk::{AlignedBuf, DiskImage, MAX_IOVECS, SECTOR_SHIFT};
use crate::engine::{Engine, Op, OpKind};
use crate::request::{
    Action, Limits, Request, RequestError, Segment, ID_BYTES, STATUS_IOERR, STATUS_OK,
};

/// Most O_DIRECT bounce buffer bytes one queue holds at a time (one batch's worth). A request
/// needing more is refused with IOERR; one that does not fit beside the rest of its batch waits
/// for the next batch.
pub const BOUNCE_BUDGET: u64 = 16 << 20;
/// Most read and write bytes one batch submits, unless a single request is larger (it then runs
/// alone); the rest of the available requests go in the next batch.
pub const BATCH_BYTES: u64 = 16 << 20;
/// Advertised `size_max`: the longest data segment. Linux uses it as its block queue's
/// max_segment_size, which must be at least a page (64 KiB on some arm64 guests); 1 MiB lets a
/// guest merge pages freely while keeping one request at most `seg_max` MiB.
pub const SIZE_MAX: u32 = 1 << 20;

/// The per-queue budgets (the defaults are [`BOUNCE_BUDGET`] and [`BATCH_BYTES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Most bounce buffer bytes held at a time.
    pub bounce: u64,
    /// Most read and write bytes per batch (a single larger request runs alone).
    pub batch_bytes: u64,
}

impl Default for Budgets {
    fn default() -> Budgets {
        Budgets {
            bounce: BOUNCE_BUDGET,
            batch_bytes: BATCH_BYTES,
        }
    }
}

/// Why a queue stopped being processed. Each is a driver bug (or attack): the spec lets the
/// device stop using the queue until the driver resets it (DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue size {0} is not a power of two")]
    InvalidSize(u16),
    #[error("the descriptor table, available or used ring lies outside guest memory")]
    RingOutsideMemory,
    #[error("cannot read the available ring")]
    ReadAvailRing(#[source] virtio_queue::Error),
    #[error("the available index moved more than the queue size ahead")]
    AvailIndexJump,
    #[error("cannot add an entry to the used ring")]
    AddUsed(#[source] virtio_queue::Error),
    #[error("cannot read the used event index")]
    NeedsNotification(#[source] virtio_queue::Error),
    #[error("cannot update the notification settings")]
    Notification(#[source] virtio_queue::Error),
}

/// A device serial as returned by GET_ID: up to 20 bytes, NUL-padded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Serial(pub [u8; ID_BYTES]);

/// Logs a warning the guest can trigger, through the worker's [`LogLimiter`].
macro_rules! guest_warn {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limiter.admit() {
            if suppressed > 0 {
                warn!("{} ({suppressed} similar messages suppressed)", format_args!($($arg)+));
            } else {
                warn!($($arg)+);
            }
        }
    };
}

/// What one call of [`QueueWorker::process_queue`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// The driver must be notified of new used entries.
    pub notify: bool,
    /// Requests were left for the next batch (a budget was reached); call again.
    pub more: bool,
    /// The rate limiter refused the next request (left in the ring): call again after this.
    pub throttled: Option<Duration>,
}

/// Processes the requests of one virtqueue; owned by that queue's worker thread.
pub struct QueueWorker {
    disk: Arc<DiskImage>,
    serial: Serial,
    engine: Engine,
    budgets: Budgets,
    log: LogLimiter,
    /// Set when the guest broke the queue; cleared when the driver resets it.
    broken: Option<QueueError>,
    /// Heads taken in the current batch, one bit each.
    in_flight: Vec<u64>,
    /// The device's rate limiter, shared with its other queues.
    limiter: Option<Arc<Mutex<RateLimiter>>>,
    /// A batch's completions, disk operations and their owners: kept between batches (empty)
    /// so that a batch allocates none of them again.
    scratch: Option<Scratch>,
    /// In-flight tracking (crate::inflight), set per event by the backend.
    pub inflight: crate::inflight::Tracker,
}

#[derive(Default)]
struct Scratch {
    completions: Vec<Completion>,
    ops: Vec<Op>,
    owners: Vec<usize>,
}

// SAFETY: the only part that is not Send is the iovec pointers inside `ops`, and `ops` is
// empty whenever the worker (and so the scratch) is not inside `process_queue`, which runs on
// one thread under the worker's lock from start to end.
unsafe impl Send for Scratch {}

/// The outcome of one request, before it is published.
struct Completion {
    head: u16,
    status_addr: Option<GuestAddress>,
    status: u8,
    /// Bytes written into guest buffers other than the status byte, when the request succeeds.
    written: u32,
}

/// What one batch has used of its budgets so far.
#[derive(Default)]
struct BatchBudget {
    requests: usize,
    bytes: u64,
    bounce: u64,
}

/// Whether a request joins the batch.
enum Admission {
    /// In the batch, with its disk operations.
    Taken(Completion, Vec<Op>),
    /// Over a budget: leave it in the ring for the next batch.
    Deferred,
}

/// Why `prepare_rw` builds no op.
enum PrepareError {
    /// The request fails with IOERR.
    Fail,
    /// The request does not fit in this batch.
    Defer,
}

impl From<()> for PrepareError {
    fn from((): ()) -> PrepareError {
        PrepareError::Fail
    }
}

/// Bytes of the descriptor table, available ring and used ring (with the event index words).
fn ring_sizes(size: u16) -> [usize; 3] {
    let n = usize::from(size);
    [16 * n, 6 + 2 * n, 6 + 8 * n]
}

impl QueueWorker {
    pub fn new(disk: Arc<DiskImage>, serial: Serial, engine: Engine) -> QueueWorker {
        QueueWorker {
            disk,
            serial,
            engine,
            budgets: Budgets::default(),
            log: LogLimiter::default(),
            broken: None,
            in_flight: Vec::new(),
            limiter: None,
            scratch: None,
            inflight: crate::inflight::Tracker::default(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Replaces the default budgets (smaller ones make tests and fuzzing reach them).
    pub fn set_budgets(&mut self, budgets: Budgets) {
        self.budgets = budgets;
    }

    /// Sets the rate limiter consulted before each request joins a batch (`None`: no limit).
    pub fn set_limiter(&mut self, limiter: Option<Arc<Mutex<RateLimiter>>>) {
        self.limiter = limiter;
    }

    /// Asks the rate limiter for `request`: `Ok(tokens)` when it may go (the bytes taken, to
    /// give back if it is deferred), `Err(wait)` when it must wait. One operation and its data
    /// bytes for a read or write; one operation for a flush, discard or write-zeroes; requests
    /// that reach no disk (GET_ID, refused or failed ones) are free.
    fn consume_tokens(&self, request: &Request) -> Result<Option<u64>, Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(None);
        };
        if request.status.is_none() {
            return Ok(None);
        }
        let bytes = match &request.action {
            Action::Read { len, .. } | Action::Write { len, .. } => *len,
            Action::Flush | Action::Discard(_) | Action::WriteZeroes(_) => 0,
            Action::GetId { .. } | Action::Fail(_) => return Ok(None),
        };
        let mut limiter = limiter.lock().unwrap_or_else(|p| p.into_inner());
        limiter.consume(bytes).map(|()| Some(bytes))
    }

    fn refund_tokens(&self, bytes: u64) {
        if let Some(limiter) = &self.limiter {
            limiter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refund(bytes);
        }
    }

    /// Why the queue is no longer processed, if the guest broke it.
    pub fn broken(&self) -> Option<&QueueError> {
        self.broken.as_ref()
    }

    /// Stops processing the queue until [`QueueWorker::reset`]; logged (rate-limited).
    pub fn mark_broken(&mut self, error: QueueError) {
        if self.broken.is_none() {
            self.disk
                .stats
                .broken_queues
                .fetch_add(1, Ordering::Relaxed);
            guest_warn!(
                self.log,
                "queue marked broken until the driver resets it: {}",
                error_chain(&error)
            );
            self.broken = Some(error);
        }
    }

    /// The driver reset the queue (the frontend stopped the vring): process it again.
    pub fn reset(&mut self) {
        self.broken = None;
    }

    /// Checks what the queue's configuration and rings let the device do safely.
    fn check_rings(queue: &Queue, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        let size = queue.size();
        if !size.is_power_of_two() {
            return Err(QueueError::InvalidSize(size));
        }
        let [desc, avail, used] = ring_sizes(size);
        for (addr, len) in [
            (queue.desc_table(), desc),
            (queue.avail_ring(), avail),
            (queue.used_ring(), used),
        ] {
            if !mem.check_range(GuestAddress(addr), len) {
                return Err(QueueError::RingOutsideMemory);
            }
        }
        Ok(())
    }

    /// Handles the requests available in `queue`, up to the batch budgets, and adds their used
    /// entries. A queue the guest broke is marked broken and left alone.
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        limits: &Limits,
    ) -> Batch {
        let mut scratch = self.scratch.take().unwrap_or_default();
        let batch = self.process_queue_with(queue, mem, limits, &mut scratch);
        // The ops point into guest memory: none outlives its batch.
        scratch.completions.clear();
        scratch.ops.clear();
        scratch.owners.clear();
        self.scratch = Some(scratch);
        batch
    }

    fn process_queue_with(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        limits: &Limits,
        scratch: &mut Scratch,
    ) -> Batch {
        if self.broken.is_some() || !queue.ready() {
            return Batch::default();
        }
        if let Err(e) = Self::check_rings(queue, mem) {
            self.mark_broken(e);
            return Batch::default();
        }
        let size = queue.size();
        self.in_flight.clear();
        self.in_flight.resize(usize::from(size).div_ceil(64), 0);

        let Scratch {
            completions,
            ops,
            owners,
        } = scratch;
        let mut budget = BatchBudget::default();
        let mut more = false;
        let mut throttled = None;
        {
            let mut avail = match queue.iter(mem) {
                Ok(avail) => avail,
                Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                    self.mark_broken(QueueError::AvailIndexJump);
                    return Batch::default();
                }
                Err(e) => {
                    self.mark_broken(QueueError::ReadAvailRing(e));
                    return Batch::default();
                }
            };
            // `iter` checked that at most a queue's worth is available; this bound is for
            // the count in `budget` alone.
            while completions.len() < usize::from(size) {
                let Some(chain) = avail.next() else {
                    break;
                };
                let head = chain.head_index();
                let request = if self.take_head(head) {
                    Request::parse(chain, limits)
                } else {
                    // The same head twice in one batch: its buffers are in use. Refused without
                    // walking it again or touching its status.
                    Request {
                        head,
                        status: None,
                        action: Action::Fail(RequestError::DuplicateHead),
                    }
                };
                let tokens = match self.consume_tokens(&request) {
                    Ok(tokens) => tokens,
                    Err(wait) => {
                        // Left in the ring, first in line once the tokens are there.
                        self.release_head(head);
                        avail.go_to_previous_position();
                        self.disk.stats.throttled.fetch_add(1, Ordering::Relaxed);
                        throttled = Some(wait);
                        break;
                    }
                };
                match self.admit(mem, request, &mut budget) {
                    Admission::Taken(completion, new_ops) => {
                        self.inflight.taken(head);
                        owners.extend(std::iter::repeat_n(completions.len(), new_ops.len()));
                        ops.extend(new_ops);
                        completions.push(completion);
                    }
                    Admission::Deferred => {
                        // Left in the ring, first in line for the next batch.
                        self.release_head(head);
                        avail.go_to_previous_position();
                        if let Some(bytes) = tokens {
                            self.refund_tokens(bytes);
                        }
                        self.disk.stats.deferred.fetch_add(1, Ordering::Relaxed);
                        more = true;
                        break;
                    }
                }
            }
        }
        if completions.is_empty() {
            return Batch {
                throttled,
                ..Batch::default()
            };
        }
        if completions.len() >= usize::from(size) {
            more = true;
        }

        self.run(mem, completions, ops, owners);

        for c in completions.iter() {
            let len = publish(mem, c);
            // A head that is not a descriptor index cannot be returned; the rest of the batch
            // still is.
            if c.head >= size {
                guest_warn!(self.log, "chain head {} is not a descriptor index", c.head);
                continue;
            }
            self.inflight.before_used(c.head);
            if let Err(e) = queue.add_used(mem, c.head, len) {
                self.mark_broken(QueueError::AddUsed(e));
                return Batch {
                    notify: true,
                    more: false,
                    throttled: None,
                };
            }
            self.inflight.after_used(c.head, queue.next_used());
        }
        match queue.needs_notification(mem) {
            Ok(notify) => Batch {
                notify,
                more,
                throttled,
            },
            Err(e) => {
                self.mark_broken(QueueError::NeedsNotification(e));
                Batch {
                    notify: true,
                    more: false,
                    throttled: None,
                }
            }
        }
    }

    /// Marks `head` in flight; false if it already is.
    fn take_head(&mut self, head: u16) -> bool {
        let (word, bit) = (usize::from(head / 64), 1u64 << (head % 64));
        match self.in_flight.get_mut(word) {
            Some(w) if *w & bit != 0 => false,
            Some(w) => {
                *w |= bit;
                true
            }
            // Not a descriptor index: nothing to protect, the chain has no descriptor.
            None => true,
        }
    }

    fn release_head(&mut self, head: u16) {
        if let Some(w) = self.in_flight.get_mut(usize::from(head / 64)) {
            *w &= !(1u64 << (head % 64));
        }
    }

    /// Decides whether `request` joins the batch and, if so, prepares its disk operations.
    fn admit(
        &mut self,
        mem: &GuestMemoryMmap,
        request: Request,
        budget: &mut BatchBudget,
    ) -> Admission {
        let mut completion = Completion {
            head: request.head,
            status_addr: request.status,
            status: STATUS_OK,
            written: 0,
        };
        if request.status.is_none() {
            let reason = match &request.action {
                Action::Fail(e) => *e,
                _ => RequestError::NoStatus,
            };
            guest_warn!(self.log, "chain {} refused: {reason}", request.head);
            self.disk.stats.refused.fetch_add(1, Ordering::Relaxed);
            completion.status = STATUS_IOERR;
            budget.requests += 1;
            return Admission::Taken(completion, Vec::new());
        }
        let new_ops: Result<Vec<Op>, PrepareError> = match &request.action {
            Action::Fail(e) => {
                guest_warn!(self.log, "request {}: {e}", request.head);
                completion.status = e.status();
                Ok(Vec::new())
            }
            // An injected fault (docs/fault-injection.md): delay_ms waits here, eio fails it.
            Action::Read { sector, len, .. } | Action::Write { sector, len, .. }
                if bulkhead_device_runtime::fault::request_fault(*sector, len.div_ceil(512)) =>
            {
                completion.status = STATUS_IOERR;
                Ok(Vec::new())
            }
            Action::Read { sector, data, len } => {
                completion.written = u32::try_from(*len).unwrap_or(u32::MAX);
                self.prepare_rw(mem, false, *sector, data, *len, budget)
            }
            Action::Write { sector, data, len } => {
                self.prepare_rw(mem, true, *sector, data, *len, budget)
            }
            Action::Flush => Ok(vec![Op::new(OpKind::Flush)]),
            Action::GetId { data } => {
                completion.written = ID_BYTES as u32;
                write_serial(mem, data, &self.serial)
                    .map(|()| Vec::new())
                    .map_err(PrepareError::from)
            }
            Action::Discard(ranges) => Ok(ranges
                .iter()
                .filter(|r| r.num_sectors > 0)
                .map(|r| {
                    let (offset, len) = r.byte_range();
                    Op::new(OpKind::Discard { offset, len })
                })
                .collect()),
            Action::WriteZeroes(ranges) => self
                .prepare_write_zeroes(ranges)
                .map_err(PrepareError::from),
        };
        let new_ops = match new_ops {
            Ok(new_ops) => new_ops,
            Err(PrepareError::Defer) => return Admission::Deferred,
            Err(PrepareError::Fail) => {
                completion.status = STATUS_IOERR;
                Vec::new()
            }
        };
        budget.requests += 1;
        self.count(&request.action);
        Admission::Taken(completion, new_ops)
    }

    fn count(&self, action: &Action) {
        let stats = &self.disk.stats;
        let count = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        match action {
            Action::Fail(_) => {}
            Action::Read { len, .. } => {
                count(&stats.reads, 1);
                count(&stats.read_bytes, *len);
            }
            Action::Write { len, .. } => {
                count(&stats.writes, 1);
                count(&stats.write_bytes, *len);
            }
            Action::Flush => count(&stats.flushes, 1),
            Action::GetId { .. } => count(&stats.get_ids, 1),
            Action::Discard(_) => count(&stats.discards, 1),
            Action::WriteZeroes(_) => count(&stats.write_zeroes, 1),
        }
    }

    /// Runs the batch's disk operations and records their outcome in `completions`.
    fn run(
        &mut self,
        mem: &GuestMemoryMmap,
        completions: &mut [Completion],
        ops: &mut [Op],
        owners: &[usize],
    ) {
        self.engine.run(&self.disk, ops);

        for (op, owner) in ops.iter().zip(owners) {
            let Some(completion) = completions.get_mut(*owner) else {
                continue;
            };
            if let Err(e) = &op.result {
                guest_warn!(
                    self.log,
                    "request {}: disk I/O failed: {e}",
                    completion.head
                );
                completion.status = STATUS_IOERR;
                continue;
            }
            if let Some(bounce) = &op.bounce {
                if copy_to_guest(mem, bounce, &op.copy_back).is_err() {
                    completion.status = STATUS_IOERR;
                }
            }
        }

        let errors = completions.iter().filter(|c| c.status != STATUS_OK).count();
        self.disk
            .stats
            .errors
            .fetch_add(errors as u64, Ordering::Relaxed);
    }

    fn prepare_write_zeroes(
        &mut self,
        ranges: &[crate::request::SectorRange],
    ) -> Result<Vec<Op>, ()> {
        let mut ops = Vec::with_capacity(ranges.len());
        for r in ranges.iter().filter(|r| r.num_sectors > 0) {
            let (offset, len) = r.byte_range();
            if let Some(align) = self.disk.direct_alignment() {
                let a = u64::from(align.offset_align);
                if !offset.is_multiple_of(a) || !len.is_multiple_of(a) {
                    guest_warn!(self.log, "write-zeroes range not aligned for O_DIRECT");
                    return Err(());
                }
            }
            ops.push(Op::new(OpKind::WriteZeroes {
                offset,
                len,
                unmap: r.unmap,
            }));
        }
        Ok(ops)
    }

    /// Builds the read or write op for guest buffers `data` (`len` bytes at `sector`), with a
    /// bounce buffer where O_DIRECT cannot use the guest buffers directly. Nothing is allocated
    /// or copied for a request that does not fit in the batch's budgets.
    fn prepare_rw(
        &mut self,
        mem: &GuestMemoryMmap,
        write: bool,
        sector: u64,
        data: &[Segment],
        len: u64,
        budget: &mut BatchBudget,
    ) -> Result<Vec<Op>, PrepareError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if budget.requests > 0 && budget.bytes.saturating_add(len) > self.budgets.batch_bytes {
            return Err(PrepareError::Defer);
        }
        // `Request::parse` checked sector + len against the capacity, so this cannot overflow.
        let offset = sector << SECTOR_SHIFT;
        let mut iovecs = Vec::with_capacity(data.len());
        for seg in data {
            match push_guest_iovecs(mem, seg.addr, seg.len as usize, &mut iovecs, MAX_IOVECS) {
                Ok(()) => {}
                Err(IovecError::OutsideMemory) => return Err(PrepareError::Fail),
                Err(IovecError::TooManyPieces) => {
                    guest_warn!(self.log, "request has more than {MAX_IOVECS} buffers");
                    return Err(PrepareError::Fail);
                }
            }
        }
        let mut bounce = None;
        let mut copy_back = Vec::new();
        if let Some(align) = self.disk.direct_alignment() {
            let offset_align = u64::from(align.offset_align);
            if !offset.is_multiple_of(offset_align) || !len.is_multiple_of(offset_align) {
                guest_warn!(
                    self.log,
                    "request at {offset:#x}+{len:#x} not aligned for O_DIRECT"
                );
                return Err(PrepareError::Fail);
            }
            let misaligned = iovecs.iter().any(|v| {
                !(v.iov_base as usize).is_multiple_of(align.mem_align as usize)
                    || !v.iov_len.is_multiple_of(align.offset_align as usize)
            });
            if misaligned {
                if len > self.budgets.bounce {
                    guest_warn!(
                        self.log,
                        "misaligned O_DIRECT request of {len} bytes is larger than the bounce budget"
                    );
                    return Err(PrepareError::Fail);
                }
                if budget.bounce.saturating_add(len) > self.budgets.bounce {
                    return Err(PrepareError::Defer);
                }
                let size = usize::try_from(len).map_err(|_| PrepareError::Fail)?;
                let mut buf = AlignedBuf::new(size, (align.mem_align as usize).max(512))
                    .map_err(|_| PrepareError::Fail)?;
                if write {
                    copy_from_guest(mem, &mut buf, data)?;
                } else {
                    copy_back = data.to_vec();
                }
                iovecs = vec![libc::iovec {
                    iov_base: buf.as_ptr().cast(),
                    iov_len: size,
                }];
                budget.bounce += len;
                bounce = Some(buf);
            }
        }
        budget.bytes = budget.bytes.saturating_add(len);
        let kind = if write {
            OpKind::Write {
                iovecs,
                offset,
                len,
            }
        } else {
            OpKind::Read {
                iovecs,
                offset,
                len,
            }
        };
        let mut op = Op::new(kind);
        op.bounce = bounce;
        op.copy_back = copy_back;
        Ok(vec![op])
    }
}

/// `error` and its sources, one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Writes the status byte and returns the used length to report.
fn publish(mem: &GuestMemoryMmap, c: &Completion) -> u32 {
    let Some(addr) = c.status_addr else {
        return 0;
    };
    if mem.write_obj(c.status, addr).is_err() {
        return 0;
    }
    if c.status == STATUS_OK {
        c.written.saturating_add(1)
    } else {
        1
    }
}

fn write_serial(mem: &GuestMemoryMmap, data: &[Segment], serial: &Serial) -> Result<(), ()> {
    let mut pos = 0usize;
    for seg in data {
        let rest = serial.0.get(pos..).unwrap_or_default();
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(seg.len as usize);
        let src = rest.get(..n).ok_or(())?;
        mem.write_slice(src, seg.addr).map_err(|_| ())?;
        pos += n;
    }
    Ok(())
}

fn copy_from_guest(
    mem: &GuestMemoryMmap,
    buf: &mut AlignedBuf,
    data: &[Segment],
) -> Result<(), ()> {
    let dst = buf.as_mut_slice();
    let mut pos = 0usize;
    for seg in data {
        let end = pos.checked_add(seg.len as usize).ok_or(())?;
        let chunk = dst.get_mut(pos..end).ok_or(())?;
        mem.read_slice(chunk, seg.addr).map_err(|_| ())?;
        pos = end;
    }
    Ok(())
}

fn copy_to_guest(mem: &GuestMemoryMmap, buf: &AlignedBuf, data: &[Segment]) -> Result<(), ()> {
    let src = buf.as_slice();
    let mut pos = 0usize;
    for seg in data {
        let end = pos.checked_add(seg.len as usize).ok_or(())?;
        let chunk = src.get(pos..end).ok_or(())?;
        mem.write_slice(chunk, seg.addr).map_err(|_| ())?;
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskImage, OpenMode};
    use crate::request::{SEGMENT_LEN, STATUS_UNSUPP};
    use bulkhead_device_runtime::rate::{BucketConfig, LimiterConfig};
    use std::io::Write;
    use std::time::Instant;
    use virtio_bindings::bindings::virtio_blk::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::tempfile::TempFile;

    const QSIZE: u16 = 32;
    const SECTORS: u64 = 64;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const MEM_SIZE: usize = 0x100_0000;

    #[derive(Clone, Copy)]
    struct D {
        addr: u64,
        len: u32,
        write: bool,
    }

    fn r(addr: u64, len: u32) -> D {
        D {
            addr,
            len,
            write: false,
        }
    }

    fn w(addr: u64, len: u32) -> D {
        D {
            addr,
            len,
            write: true,
        }
    }

    struct Harness {
        mem: GuestMemoryMmap,
        image: TempFile,
        worker: QueueWorker,
        limits: Limits,
        /// Batches the last `run_chains` took.
        rounds: usize,
    }

    fn sector_pattern(sector: u64) -> u8 {
        (sector as u8).wrapping_mul(3).wrapping_add(1)
    }

    impl Harness {
        fn with(read_only: bool, direct: bool, uring: bool) -> Harness {
            Self::with_image(
                TempFile::new().expect("temp file"),
                read_only,
                direct,
                uring,
            )
        }

        fn with_image(image: TempFile, read_only: bool, direct: bool, uring: bool) -> Harness {
            let mut content = Vec::new();
            for s in 0..SECTORS {
                content.extend(std::iter::repeat_n(sector_pattern(s), 512));
            }
            image.as_file().write_all(&content).expect("fill image");
            let disk = DiskImage::open(image.as_path(), OpenMode { read_only, direct })
                .expect("open image");
            let disk = Arc::new(disk);
            let engine = if uring {
                Engine::new(u32::from(QSIZE)).0
            } else {
                Engine::Sync
            };
            let mut serial = Serial::default();
            serial.0[..15].copy_from_slice(b"bulkhead-serial");
            let limits = Limits {
                capacity_sectors: disk.capacity_sectors(),
                seg_max: u32::from(QSIZE) - 2,
                size_max: SIZE_MAX,
                max_discard_sectors: 16,
                max_discard_seg: 4,
                max_write_zeroes_sectors: 16,
                max_write_zeroes_seg: 4,
                read_only,
                discard: true,
                write_zeroes: true,
            };
            Harness {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
                    .expect("guest memory"),
                image,
                worker: QueueWorker::new(disk, serial, engine),
                limits,
                rounds: 0,
            }
        }

        fn new() -> Harness {
            Harness::with(false, false, true)
        }

        fn header(&self, addr: u64, request_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&request_type.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem
                .write_slice(&h, GuestAddress(addr))
                .expect("header");
        }

        fn fill(&self, addr: u64, len: usize, byte: u8) {
            self.mem
                .write_slice(&vec![byte; len], GuestAddress(addr))
                .expect("fill");
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem
                .read_slice(&mut v, GuestAddress(addr))
                .expect("read");
            v
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).expect("status")
        }

        fn image(&self) -> Vec<u8> {
            std::fs::read(self.image.as_path()).expect("image")
        }

        /// Lays the chains out in the descriptor table, processes the queue and returns the
        /// used ring entries (head, length) and whether a notification is due.
        fn run_chains(&mut self, chains: &[Vec<D>]) -> (Vec<(u32, u32)>, bool) {
            let vq = MockSplitQueue::new(&self.mem, QSIZE);
            let mut descs = Vec::new();
            for chain in chains {
                let start = descs.len();
                for (i, d) in chain.iter().enumerate() {
                    let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
                    if i + 1 < chain.len() {
                        flags |= VRING_DESC_F_NEXT;
                    }
                    descs.push(RawDescriptor::from(SplitDescriptor::new(
                        d.addr,
                        d.len,
                        flags as u16,
                        (start + i + 1) as u16,
                    )));
                }
            }
            vq.add_desc_chains(&descs, 0).expect("add chains");
            let mut queue: Queue = vq.create_queue().expect("queue");
            let (notify, rounds) = drain(&mut self.worker, &self.mem, &self.limits, &mut queue);
            self.rounds = rounds;
            let used = vq.used().idx().load();
            let entries = (0..used)
                .map(|i| {
                    let e = vq
                        .used()
                        .ring()
                        .ref_at(usize::from(i))
                        .expect("used")
                        .load();
                    (e.id(), e.len())
                })
                .collect();
            (entries, notify)
        }

        /// Runs one chain; returns its used length.
        fn run(&mut self, chain: &[D]) -> u32 {
            self.fill(STATUS, 1, 0xff);
            let (used, _) = self.run_chains(&[chain.to_vec()]);
            assert_eq!(used.len(), 1);
            assert_eq!(used[0].0, 0);
            used[0].1
        }
    }

    /// Processes `queue` the way the backend does: batches until none is left over, and after
    /// a throttled batch, again once the wait is over without a new kick (the worker's epoll
    /// timeout). Returns whether a notification is due and how many batches ran.
    fn drain(
        worker: &mut QueueWorker,
        mem: &GuestMemoryMmap,
        limits: &Limits,
        queue: &mut Queue,
    ) -> (bool, usize) {
        let mut notify = false;
        let mut rounds = 0;
        loop {
            let batch = worker.process_queue(queue, mem, limits);
            rounds += 1;
            notify |= batch.notify;
            if let Some(wait) = batch.throttled {
                std::thread::sleep(wait);
                continue;
            }
            if !batch.more {
                break;
            }
            assert!(rounds < 10_000, "the queue never drains");
        }
        (notify, rounds)
    }

    fn engines() -> [bool; 2] {
        [false, true]
    }

    #[test]
    fn test_read_two_sectors_data_and_status_ok() {
        for uring in engines() {
            let mut h = Harness::with(false, false, uring);
            h.header(HDR, VIRTIO_BLK_T_IN, 3);
            h.fill(DATA, 1024, 0);
            let used = h.run(&[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]);
            assert_eq!(used, 1025);
            assert_eq!(h.status(), STATUS_OK);
            let data = h.read(DATA, 1024);
            assert!(data[..512].iter().all(|&b| b == sector_pattern(3)));
            assert!(data[512..].iter().all(|&b| b == sector_pattern(4)));
        }
    }

    /// A harness whose image is in /dev/shm, if that is a tmpfs here.
    fn tmpfs_harness() -> Option<Harness> {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let tmpfs = mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/dev/shm") && l.contains(" tmpfs "));
        if !tmpfs {
            return None;
        }
        let image = TempFile::new_in(std::path::Path::new("/dev/shm")).expect("temp file");
        Some(Harness::with_image(image, false, false, true))
    }

    #[test]
    fn test_tmpfs_image_served_inline_with_uring_engine() {
        let Some(mut h) = tmpfs_harness() else {
            return;
        };
        assert!(h.worker.disk.memory_backed());
        // Under qemu-user (the aarch64 unit tests) io_uring cannot be set up and the engine
        // falls back to the synchronous one: the requests below still go through the inline
        // path, only the "despite io_uring" part is not shown there.
        if !h.worker.engine().is_uring() {
            eprintln!(
                "io_uring unavailable here: the tmpfs inline path runs beside the sync engine"
            );
        }
        h.header(HDR, VIRTIO_BLK_T_OUT, 5);
        h.fill(DATA, 1024, 0x5a);
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 1024), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_OK);
        h.header(HDR, VIRTIO_BLK_T_IN, 4);
        h.fill(DATA, 2048, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 2048), w(STATUS, 1)]), 2049);
        assert_eq!(h.status(), STATUS_OK);
        let data = h.read(DATA, 2048);
        assert!(data[..512].iter().all(|&b| b == sector_pattern(4)));
        assert!(data[512..1536].iter().all(|&b| b == 0x5a));
        assert!(data[1536..].iter().all(|&b| b == sector_pattern(7)));
        h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_OK);
    }

    #[test]
    fn test_write_scattered_buffers_image_updated() {
        for uring in engines() {
            let mut h = Harness::with(false, false, uring);
            h.header(HDR, VIRTIO_BLK_T_OUT, 10);
            h.fill(DATA, 512, 0x11);
            h.fill(DATA + 0x1000, 1024, 0x22);
            let used = h.run(&[
                r(HDR, 16),
                r(DATA, 512),
                r(DATA + 0x1000, 1024),
                w(STATUS, 1),
            ]);
            assert_eq!(used, 1);
            assert_eq!(h.status(), STATUS_OK);
            let img = h.image();
            assert!(img[10 * 512..11 * 512].iter().all(|&b| b == 0x11));
            assert!(img[11 * 512..13 * 512].iter().all(|&b| b == 0x22));
            assert!(img[13 * 512..14 * 512]
                .iter()
                .all(|&b| b == sector_pattern(13)));
        }
    }

    #[test]
    fn test_flush_no_data_ok() {
        for uring in engines() {
            let mut h = Harness::with(false, false, uring);
            h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
            assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_OK);
        }
    }

    #[test]
    fn test_flush_with_data_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
    }

    #[test]
    fn test_get_id_serial_padded_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
        h.fill(DATA, 20, 0xee);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]), 21);
        assert_eq!(h.status(), STATUS_OK);
        let id = h.read(DATA, 20);
        assert_eq!(&id[..15], b"bulkhead-serial");
        assert!(id[15..].iter().all(|&b| b == 0));
    }

    #[test]
    fn test_get_id_oversize_buffer_writes_only_twenty_bytes() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
        h.fill(DATA, 4096, 0xee);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)]), 21);
        assert_eq!(h.status(), STATUS_OK);
        let buf = h.read(DATA, 4096);
        assert_eq!(&buf[..15], b"bulkhead-serial");
        assert!(buf[20..].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn test_get_id_short_buffer_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
        h.fill(DATA, 64, 0xee);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 10), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        assert!(h.read(DATA, 64).iter().all(|&b| b == 0xee));
    }

    #[test]
    fn test_unknown_type_unsupp() {
        let mut h = Harness::new();
        for t in [2, VIRTIO_BLK_T_SECURE_ERASE, 10, 0xdead_beef] {
            h.header(HDR, t, 0);
            assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_UNSUPP, "type {t}");
        }
    }

    #[test]
    fn test_read_with_readable_data_wrong_direction_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
    }

    #[test]
    fn test_write_with_writable_data_wrong_direction_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_OUT, 0);
        h.fill(DATA, 512, 0x55);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        assert!(h.image()[..512].iter().all(|&b| b == sector_pattern(0)));
    }

    #[test]
    fn test_short_header_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 8), w(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
    }

    #[test]
    fn test_header_split_across_descriptors_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 5);
        // Move the second half of the header elsewhere.
        let tail = h.read(HDR + 8, 8);
        h.mem
            .write_slice(&tail, GuestAddress(HDR + 0x100))
            .expect("tail");
        assert_eq!(
            h.run(&[r(HDR, 8), r(HDR + 0x100, 8), w(DATA, 512), w(STATUS, 1)]),
            513
        );
        assert_eq!(h.status(), STATUS_OK);
        assert!(h.read(DATA, 512).iter().all(|&b| b == sector_pattern(5)));
    }

    #[test]
    fn test_status_in_data_descriptor_any_layout_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 2);
        // One writable descriptor holding the data and, as its last byte, the status.
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 513)]), 513);
        assert_eq!(h.read(DATA + 512, 1)[0], STATUS_OK);
        assert!(h.read(DATA, 512).iter().all(|&b| b == sector_pattern(2)));
    }

    #[test]
    fn test_missing_status_used_len_zero() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_OUT, 0);
        h.fill(DATA, 512, 0x77);
        // The last descriptor is readable: there is nowhere to put a status.
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 512)]), 0);
        assert!(h.image()[..512].iter().all(|&b| b == sector_pattern(0)));
        // A header alone.
        assert_eq!(h.run(&[r(HDR, 16)]), 0);
        // A zero-length writable "status".
        assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 0)]), 0);
        assert_eq!(h.status(), 0xff);
    }

    #[test]
    fn test_readable_after_writable_refused_unwalked() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        // Refused at the third descriptor: the status descriptor after it is never read, so
        // nothing is written back and the chain is returned with used length 0.
        assert_eq!(
            h.run(&[r(HDR, 16), w(DATA, 512), r(DATA + 0x1000, 16), w(STATUS, 1)]),
            0
        );
        assert_eq!(h.status(), 0xff);
        assert_eq!(h.worker.disk.stats.refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn test_out_of_range_sector_ioerr() {
        let mut h = Harness::new();
        for (t, sector, len) in [
            (VIRTIO_BLK_T_IN, SECTORS, 512),
            (VIRTIO_BLK_T_IN, SECTORS - 1, 1024),
            (VIRTIO_BLK_T_OUT, SECTORS - 1, 1024),
            (VIRTIO_BLK_T_IN, u64::MAX, 512),
            (VIRTIO_BLK_T_OUT, u64::MAX - 1, 1024),
            (VIRTIO_BLK_T_IN, 1 << 55, 512),
        ] {
            h.header(HDR, t, sector);
            h.fill(DATA, 1024, 0x99);
            let data = if t == VIRTIO_BLK_T_IN {
                w(DATA, len)
            } else {
                r(DATA, len)
            };
            assert_eq!(h.run(&[r(HDR, 16), data, w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_IOERR, "type {t} sector {sector}");
        }
        let img = h.image();
        assert!(img[(SECTORS as usize - 1) * 512..]
            .iter()
            .all(|&b| b == sector_pattern(SECTORS - 1)));
    }

    #[test]
    fn test_last_sector_read_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, SECTORS - 1);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
        assert_eq!(h.status(), STATUS_OK);
    }

    #[test]
    fn test_unaligned_length_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 500), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        h.header(HDR, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 513), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
    }

    #[test]
    fn test_zero_length_read_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_OK);
    }

    #[test]
    fn test_buffer_outside_guest_memory_refused() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        let beyond = MEM_SIZE as u64 - 256;
        // A data buffer outside memory: refused there, the status descriptor is never read.
        assert_eq!(h.run(&[r(HDR, 16), w(beyond, 512), w(STATUS, 1)]), 0);
        assert_eq!(h.status(), 0xff);
        assert_eq!(h.run(&[r(HDR, 16), w(u64::MAX - 10, 512), w(STATUS, 1)]), 0);
        assert_eq!(h.status(), 0xff);
        // Header outside memory.
        assert_eq!(h.run(&[r(u64::MAX - 4, 16), w(STATUS, 1)]), 0);
        assert_eq!(h.status(), 0xff);
        // Status outside memory: nothing can be reported.
        assert_eq!(h.run(&[r(HDR, 16), w(MEM_SIZE as u64, 1)]), 0);
        // The next good request is served.
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
        assert_eq!(h.status(), STATUS_OK);
    }

    #[test]
    fn test_too_many_descriptors_refused_unwalked() {
        let mut h = Harness::new();
        h.limits.seg_max = 4;
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        let mut chain = vec![r(HDR, 16)];
        // seg_max + 1 data descriptors: refused at the one too many. The walk stops there, so
        // the status byte is neither found nor written, and no data was read.
        for i in 0..5 {
            chain.push(w(DATA + i * 512, 512));
        }
        chain.push(w(STATUS, 1));
        h.fill(DATA, 5 * 512, 0xee);
        assert_eq!(h.run(&chain), 0);
        assert_eq!(h.status(), 0xff);
        assert!(h.read(DATA, 5 * 512).iter().all(|&b| b == 0xee));
        chain.remove(1);
        assert_eq!(h.run(&chain), 4 * 512 + 1);
        assert_eq!(h.status(), STATUS_OK);
    }

    #[test]
    fn test_read_only_write_ioerr_image_unchanged() {
        let mut h = Harness::with(true, false, true);
        h.header(HDR, VIRTIO_BLK_T_OUT, 0);
        h.fill(DATA, 512, 0x42);
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        assert!(h.image()[..512].iter().all(|&b| b == sector_pattern(0)));
        // Reads still work.
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
        assert_eq!(h.status(), STATUS_OK);
    }

    fn segments(h: &Harness, addr: u64, segs: &[(u64, u32, u32)]) -> u32 {
        for (i, (sector, num, flags)) in segs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&num.to_le_bytes());
            raw[12..].copy_from_slice(&flags.to_le_bytes());
            h.mem
                .write_slice(&raw, GuestAddress(addr + i as u64 * SEGMENT_LEN))
                .expect("segment");
        }
        (segs.len() as u64 * SEGMENT_LEN) as u32
    }

    #[test]
    fn test_discard_and_write_zeroes_ranges_read_zero() {
        for uring in engines() {
            let mut h = Harness::with(false, false, uring);
            h.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
            let len = segments(&h, DATA, &[(8, 8, 0), (32, 1, 0)]);
            assert_eq!(h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_OK);

            h.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
            let len = segments(
                &h,
                DATA,
                &[(1, 2, 0), (40, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
            );
            assert_eq!(h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_OK);

            let img = h.image();
            for s in 0..SECTORS {
                let zeroed =
                    (8..16).contains(&s) || s == 32 || (1..3).contains(&s) || (40..43).contains(&s);
                let expected = if zeroed { 0 } else { sector_pattern(s) };
                let at = s as usize * 512;
                assert!(
                    img[at..at + 512].iter().all(|&b| b == expected),
                    "sector {s} (uring {uring})"
                );
            }
        }
    }

    #[test]
    fn test_discard_bad_segment_lists_rejected() {
        let mut h = Harness::new();
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        type Case<'a> = (u32, &'a [(u64, u32, u32)], u32, u8);
        let cases: &[Case] = &[
            // unmap is not allowed on discard
            (VIRTIO_BLK_T_DISCARD, &[(0, 1, unmap)], 0, STATUS_UNSUPP),
            // unknown flag
            (VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)], 0, STATUS_UNSUPP),
            // beyond the capacity
            (
                VIRTIO_BLK_T_DISCARD,
                &[(SECTORS - 1, 2, 0)],
                0,
                STATUS_IOERR,
            ),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                &[(u64::MAX, 1, 0)],
                0,
                STATUS_IOERR,
            ),
            // more sectors than max_*_sectors
            (VIRTIO_BLK_T_DISCARD, &[(0, 17, 0)], 0, STATUS_IOERR),
            // more segments than max_*_seg
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                &[(0, 1, 0), (1, 1, 0), (2, 1, 0), (3, 1, 0), (4, 1, 0)],
                0,
                STATUS_IOERR,
            ),
            // a list that is not a whole number of segments
            (VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)], 1, STATUS_IOERR),
        ];
        for (i, (t, segs, extra, status)) in cases.iter().enumerate() {
            h.header(HDR, *t, 0);
            let len = segments(&h, DATA, segs) + extra;
            assert_eq!(h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), *status, "case {i}");
        }
        // No segment at all.
        h.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        // Segments in a writable buffer.
        let len = segments(&h, DATA, &[(0, 1, 0)]);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, len), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        // Nothing was zeroed.
        let img = h.image();
        for s in 0..SECTORS {
            let at = s as usize * 512;
            assert!(img[at..at + 512].iter().all(|&b| b == sector_pattern(s)));
        }
    }

    #[test]
    fn test_discard_not_negotiated_unsupp() {
        let mut h = Harness::new();
        h.limits.discard = false;
        h.limits.write_zeroes = false;
        for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            h.header(HDR, t, 0);
            let len = segments(&h, DATA, &[(0, 1, 0)]);
            assert_eq!(h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_UNSUPP);
        }
    }

    #[test]
    fn test_read_only_discard_and_write_zeroes_ioerr() {
        let mut h = Harness::with(true, false, true);
        for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            h.header(HDR, t, 0);
            let len = segments(&h, DATA, &[(0, 1, 0)]);
            assert_eq!(h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_IOERR);
        }
        assert!(h.image()[..512].iter().all(|&b| b == sector_pattern(0)));
    }

    #[test]
    fn test_batch_of_requests_all_completed_once() {
        let mut h = Harness::new();
        let mut chains = Vec::new();
        for i in 0..8u64 {
            let hdr = HDR + i * 0x100;
            h.header(hdr, VIRTIO_BLK_T_IN, i);
            chains.push(vec![
                r(hdr, 16),
                w(DATA + i * 0x1000, 512),
                w(STATUS + i, 1),
            ]);
        }
        let (used, notify) = h.run_chains(&chains);
        assert!(notify);
        assert_eq!(used.len(), 8);
        for (i, (head, len)) in used.iter().enumerate() {
            assert_eq!(*head, 3 * i as u32);
            assert_eq!(*len, 513);
            let i = i as u64;
            assert_eq!(h.read(STATUS + i, 1)[0], STATUS_OK);
            assert!(h
                .read(DATA + i * 0x1000, 512)
                .iter()
                .all(|&b| b == sector_pattern(i)));
        }
    }

    /// Runs `n` one-sector reads under `limit`; returns the time taken, after checking that
    /// every read completed once, in ring order, with its data.
    fn run_limited_reads(limit: LimiterConfig, n: u64) -> Duration {
        let mut h = Harness::new();
        h.worker
            .set_limiter(Some(Arc::new(Mutex::new(RateLimiter::new(&limit)))));
        let mut chains = Vec::new();
        for i in 0..n {
            let hdr = HDR + i * 0x100;
            h.header(hdr, VIRTIO_BLK_T_IN, i % SECTORS);
            chains.push(vec![
                r(hdr, 16),
                w(DATA + i * 0x1000, 512),
                w(STATUS + i, 1),
            ]);
        }
        let start = Instant::now();
        let (used, notify) = h.run_chains(&chains);
        let elapsed = start.elapsed();
        assert!(notify);
        let heads: Vec<u32> = used.iter().map(|(head, _)| *head).collect();
        let expected: Vec<u32> = (0..n as u32).map(|i| 3 * i).collect();
        assert_eq!(heads, expected, "every request once, in ring order");
        for i in 0..n {
            assert_eq!(h.read(STATUS + i, 1)[0], STATUS_OK);
            assert!(h
                .read(DATA + i * 0x1000, 512)
                .iter()
                .all(|&b| b == sector_pattern(i % SECTORS)));
        }
        assert!(h.worker.disk.stats.throttled.load(Ordering::Relaxed) > 0);
        elapsed
    }

    /// `expected` within 10% below (the limit holds) and a loaded machine's slack above.
    fn assert_near(elapsed: Duration, expected: Duration) {
        assert!(
            elapsed >= expected.mul_f64(0.9) && elapsed <= expected.mul_f64(1.5),
            "took {elapsed:?}, expected {expected:?}"
        );
    }

    #[test]
    fn test_rate_limit_bandwidth_throttles_then_resumes_in_order() {
        // 1 KiB per 50 ms: the full bucket passes 2 reads of 512 bytes, the other 8 (4 KiB)
        // take 4 refills.
        let limit = LimiterConfig {
            bandwidth: BucketConfig {
                size: 1024,
                one_time_burst: 0,
                refill_time_ms: 50,
            },
            ..LimiterConfig::default()
        };
        assert_near(run_limited_reads(limit, 10), Duration::from_millis(200));
    }

    #[test]
    fn test_rate_limit_ops_throttles_then_resumes_in_order() {
        // 2 requests per 40 ms after a one-time burst of 2: 4 pass at once, the other 6 take
        // 3 refills.
        let limit = LimiterConfig {
            ops: BucketConfig {
                size: 2,
                one_time_burst: 2,
                refill_time_ms: 40,
            },
            ..LimiterConfig::default()
        };
        assert_near(run_limited_reads(limit, 10), Duration::from_millis(120));
    }

    #[test]
    fn test_rate_limit_throttled_batch_leaves_requests_in_ring() {
        let mut h = Harness::new();
        let limit = LimiterConfig {
            ops: BucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time_ms: 60_000,
            },
            ..LimiterConfig::default()
        };
        h.worker
            .set_limiter(Some(Arc::new(Mutex::new(RateLimiter::new(&limit)))));
        let vq = MockSplitQueue::new(&h.mem, QSIZE);
        let mut descs = Vec::new();
        for i in 0..4u64 {
            let hdr = HDR + i * 0x100;
            h.header(hdr, VIRTIO_BLK_T_IN, i);
            for (k, d) in [r(hdr, 16), w(DATA + i * 0x1000, 512), w(STATUS + i, 1)]
                .iter()
                .enumerate()
            {
                let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
                if k < 2 {
                    flags |= VRING_DESC_F_NEXT;
                }
                let index = descs.len() as u16;
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    d.addr,
                    d.len,
                    flags as u16,
                    index + 1,
                )));
            }
        }
        vq.add_desc_chains(&descs, 0).expect("add chains");
        let mut queue: Queue = vq.create_queue().expect("queue");
        let batch = h.worker.process_queue(&mut queue, &h.mem, &h.limits);
        assert!(batch.notify && !batch.more);
        let wait = batch.throttled.expect("throttled");
        assert!(
            wait > Duration::from_secs(20),
            "waits for the refill: {wait:?}"
        );
        assert_eq!(vq.used().idx().load(), 2);
        // The refused request is still next: nothing taken, again.
        let batch = h.worker.process_queue(&mut queue, &h.mem, &h.limits);
        assert!(batch.throttled.is_some() && !batch.notify);
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(queue.next_avail(), 2);
        assert_eq!(h.worker.disk.stats.throttled.load(Ordering::Relaxed), 2);
        assert_eq!(h.worker.disk.stats.reads.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn test_indirect_chain_read_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 7);
        let table = 0x40_0000u64;
        let descs = [
            SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
            SplitDescriptor::new(
                DATA,
                512,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                2,
            ),
            SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            h.mem
                .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
                .expect("indirect descriptor");
        }
        let vq = MockSplitQueue::new(&h.mem, QSIZE);
        let head = RawDescriptor::from(SplitDescriptor::new(
            table,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        vq.add_desc_chains(&[head], 0).expect("chain");
        let mut queue: Queue = vq.create_queue().expect("queue");
        drain(&mut h.worker, &h.mem, &h.limits, &mut queue);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).expect("used").load().len(), 513);
        assert_eq!(h.status(), STATUS_OK);
        assert!(h.read(DATA, 512).iter().all(|&b| b == sector_pattern(7)));
    }

    #[test]
    fn test_direct_misaligned_buffers_bounced() {
        let mut h = Harness::with(false, true, true);
        // Odd guest addresses cannot go to O_DIRECT as they are.
        h.header(HDR, VIRTIO_BLK_T_OUT, 0);
        h.fill(DATA + 1, 4096, 0x5a);
        assert_eq!(h.run(&[r(HDR, 16), r(DATA + 1, 4096), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_OK);
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        h.fill(DATA + 0x10001, 4096, 0);
        assert_eq!(
            h.run(&[r(HDR, 16), w(DATA + 0x10001, 4096), w(STATUS, 1)]),
            4097
        );
        assert_eq!(h.status(), STATUS_OK);
        assert!(h.read(DATA + 0x10001, 4096).iter().all(|&b| b == 0x5a));
        // Aligned buffers go straight through.
        h.header(HDR, VIRTIO_BLK_T_IN, 8);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)]), 4097);
        assert_eq!(h.status(), STATUS_OK);
        assert!(h.read(DATA, 512).iter().all(|&b| b == sector_pattern(8)));
    }

    /// A queue laid out by hand: `descs` stored at their indices, `avail` made available.
    fn raw_queue<'a>(
        mem: &'a GuestMemoryMmap,
        descs: &[(u16, SplitDescriptor)],
        avail: &[u16],
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::new(mem, QSIZE);
        for (index, d) in descs {
            vq.desc_table()
                .store(*index, RawDescriptor::from(*d))
                .expect("descriptor");
        }
        for (i, head) in avail.iter().enumerate() {
            vq.avail()
                .ring()
                .ref_at(i)
                .expect("avail slot")
                .store(*head);
        }
        vq.avail().idx().store(avail.len() as u16);
        let queue: Queue = vq.create_queue().expect("queue");
        (vq, queue)
    }

    fn used_entries(vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        (0..vq.used().idx().load())
            .map(|i| {
                let e = vq
                    .used()
                    .ring()
                    .ref_at(usize::from(i))
                    .expect("used")
                    .load();
                (e.id(), e.len())
            })
            .collect()
    }

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    /// A good read of sector `sector` at descriptor indices `first..first + 3`.
    fn good_read(h: &Harness, first: u16, sector: u64) -> [(u16, SplitDescriptor); 3] {
        h.header(HDR + 0x800, VIRTIO_BLK_T_IN, sector);
        [
            (
                first,
                SplitDescriptor::new(HDR + 0x800, 16, NEXT, first + 1),
            ),
            (
                first + 1,
                SplitDescriptor::new(DATA + 0x8000, 512, NEXT | WRITE, first + 2),
            ),
            (first + 2, SplitDescriptor::new(STATUS + 0x80, 1, WRITE, 0)),
        ]
    }

    /// Asserts that the good read laid out by `good_read` completed.
    fn assert_good_read_done(h: &Harness, used: (u32, u32), head: u16, sector: u64) {
        assert_eq!(used, (u32::from(head), 513));
        assert_eq!(h.read(STATUS + 0x80, 1)[0], STATUS_OK);
        assert!(h
            .read(DATA + 0x8000, 512)
            .iter()
            .all(|&b| b == sector_pattern(sector)));
    }

    #[test]
    fn test_looping_chain_refused_next_served() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        h.fill(STATUS, 1, 0xff);
        let mut descs = vec![
            (0, SplitDescriptor::new(HDR, 16, NEXT, 1)),
            (1, SplitDescriptor::new(DATA, 512, NEXT | WRITE, 2)),
            // Points back at descriptor 1: the chain never ends.
            (2, SplitDescriptor::new(STATUS, 1, NEXT | WRITE, 1)),
        ];
        descs.extend(good_read(&h, 3, 9));
        let (vq, mut queue) = raw_queue(&h.mem, &descs, &[0, 3]);
        drain(&mut h.worker, &h.mem, &h.limits, &mut queue);
        let used = used_entries(&vq);
        assert_eq!(used.len(), 2);
        assert_eq!(used[0], (0, 0));
        assert_eq!(h.status(), 0xff);
        assert_good_read_done(&h, used[1], 3, 9);
        assert!(h.worker.broken().is_none());
    }

    #[test]
    fn test_loop_longer_than_seg_max_stops_at_seg_max() {
        let mut h = Harness::new();
        h.limits.seg_max = 2;
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        // A self-loop of writable descriptors: the walk stops after seg_max + 2 of them.
        let descs = [
            (0, SplitDescriptor::new(HDR, 16, NEXT, 1)),
            (1, SplitDescriptor::new(DATA, 512, NEXT | WRITE, 1)),
        ];
        let (vq, mut queue) = raw_queue(&h.mem, &descs, &[0]);
        drain(&mut h.worker, &h.mem, &h.limits, &mut queue);
        assert_eq!(used_entries(&vq), vec![(0, 0)]);
        assert_eq!(h.worker.disk.stats.refused.load(Ordering::Relaxed), 1);
    }

    fn write_indirect_table(h: &Harness, table: u64, descs: &[SplitDescriptor]) {
        for (i, d) in descs.iter().enumerate() {
            h.mem
                .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
                .expect("indirect descriptor");
        }
    }

    #[test]
    fn test_nested_indirect_refused_next_served() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        h.fill(STATUS, 1, 0xff);
        let outer = 0x40_0000u64;
        let inner = 0x41_0000u64;
        write_indirect_table(&h, inner, &[SplitDescriptor::new(STATUS, 1, WRITE, 0)]);
        write_indirect_table(
            &h,
            outer,
            &[
                SplitDescriptor::new(HDR, 16, NEXT, 1),
                SplitDescriptor::new(DATA, 512, NEXT | WRITE, 2),
                // An indirect table inside an indirect table (forbidden, 2.7.5.3.1).
                SplitDescriptor::new(inner, 16, VRING_DESC_F_INDIRECT as u16, 0),
            ],
        );
        let mut descs = vec![(
            0,
            SplitDescriptor::new(outer, 48, VRING_DESC_F_INDIRECT as u16, 0),
        )];
        descs.extend(good_read(&h, 1, 4));
        let (vq, mut queue) = raw_queue(&h.mem, &descs, &[0, 1]);
        drain(&mut h.worker, &h.mem, &h.limits, &mut queue);
        let used = used_entries(&vq);
        assert_eq!(used[0], (0, 0));
        assert_eq!(h.status(), 0xff);
        assert_good_read_done(&h, used[1], 1, 4);
    }

    #[test]
    fn test_chain_over_4gib_refused_next_served() {
        // With size_max in force, the first huge descriptor is refused.
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        h.fill(STATUS, 1, 0xff);
        let mut descs = vec![
            (0, SplitDescriptor::new(HDR, 16, NEXT, 1)),
            (1, SplitDescriptor::new(DATA, 0x8000_0000, NEXT | WRITE, 2)),
            (2, SplitDescriptor::new(DATA, 0x8000_0000, NEXT | WRITE, 3)),
            (3, SplitDescriptor::new(STATUS, 1, WRITE, 0)),
        ];
        descs.extend(good_read(&h, 4, 2));
        let (vq, mut queue) = raw_queue(&h.mem, &descs, &[0, 4]);
        drain(&mut h.worker, &h.mem, &h.limits, &mut queue);
        let used = used_entries(&vq);
        assert_eq!(used[0], (0, 0));
        assert_eq!(h.status(), 0xff);
        assert_good_read_done(&h, used[1], 4, 2);

        // Without size_max, 300 descriptors of 15 MiB (all in guest memory) in an indirect
        // table: the chain iterator cuts the chain where it passes 4 GiB, and the cut is seen.
        let mut h = Harness::new();
        h.limits.size_max = u32::MAX;
        h.limits.seg_max = 1000;
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        h.fill(STATUS, 1, 0xff);
        let big = (MEM_SIZE as u64 - HDR) as u32;
        let count = 300u16;
        let mut table = vec![SplitDescriptor::new(HDR, 16, NEXT, 1)];
        for i in 1..count - 1 {
            table.push(SplitDescriptor::new(HDR, big, NEXT | WRITE, i + 1));
        }
        table.push(SplitDescriptor::new(STATUS, 1, WRITE, 0));
        assert!(u64::from(big) * u64::from(count - 2) > 1 << 32);
        let indirect = 0x40_0000u64;
        write_indirect_table(&h, indirect, &table);
        let mut descs = vec![(
            0,
            SplitDescriptor::new(
                indirect,
                16 * u32::from(count),
                VRING_DESC_F_INDIRECT as u16,
                0,
            ),
        )];
        descs.extend(good_read(&h, 1, 2));
        let (vq, mut queue) = raw_queue(&h.mem, &descs, &[0, 1]);
        drain(&mut h.worker, &h.mem, &h.limits, &mut queue);
        let used = used_entries(&vq);
        assert_eq!(used[0], (0, 0));
        assert_eq!(h.status(), 0xff);
        assert_good_read_done(&h, used[1], 1, 2);
    }

    #[test]
    fn test_descriptor_over_size_max_refused_next_served() {
        let mut h = Harness::new();
        h.limits.size_max = 1024;
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        // 1024 + 16 bytes are allowed (a header or status may share the descriptor)...
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]), 1025);
        assert_eq!(h.status(), STATUS_OK);
        // ...a larger descriptor is not, and nothing is read into it.
        h.fill(DATA, 2048, 0xee);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 1536), w(STATUS, 1)]), 0);
        assert_eq!(h.status(), 0xff);
        assert!(h.read(DATA, 2048).iter().all(|&b| b == 0xee));
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
        assert_eq!(h.status(), STATUS_OK);
    }

    #[test]
    fn test_duplicate_in_flight_head_refused_once_executed() {
        let mut h = Harness::new();
        let descs = good_read(&h, 0, 6);
        // The same head made available twice in one batch.
        let (vq, mut queue) = raw_queue(&h.mem, &descs, &[0, 0]);
        drain(&mut h.worker, &h.mem, &h.limits, &mut queue);
        let used = used_entries(&vq);
        assert_eq!(used.len(), 2);
        assert_good_read_done(&h, used[0], 0, 6);
        assert_eq!(used[1], (0, 0));
        let stats = &h.worker.disk.stats;
        assert_eq!(stats.reads.load(Ordering::Relaxed), 1);
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
        // The next batch serves it again.
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
    }

    #[test]
    fn test_avail_index_jump_marks_queue_broken_until_reset() {
        let mut h = Harness::new();
        let descs = good_read(&h, 0, 3);
        let (vq, mut queue) = raw_queue(&h.mem, &descs, &[0]);
        // The driver claims more than a queue's worth of new entries.
        vq.avail().idx().store(QSIZE + 1);
        let batch = h.worker.process_queue(&mut queue, &h.mem, &h.limits);
        assert_eq!(batch, Batch::default());
        assert!(matches!(
            h.worker.broken(),
            Some(QueueError::AvailIndexJump)
        ));
        // Kicks are ignored, not retried, while the queue is broken.
        vq.avail().idx().store(1);
        let batch = h.worker.process_queue(&mut queue, &h.mem, &h.limits);
        assert_eq!(batch, Batch::default());
        assert_eq!(vq.used().idx().load(), 0);
        assert_eq!(h.worker.disk.stats.broken_queues.load(Ordering::Relaxed), 1);
        // The driver resets the queue: served again.
        h.worker.reset();
        drain(&mut h.worker, &h.mem, &h.limits, &mut queue);
        let used = used_entries(&vq);
        assert_good_read_done(&h, used[0], 0, 3);
    }

    #[test]
    fn test_used_ring_outside_memory_broken_nothing_executed() {
        let mut h = Harness::new();
        h.header(HDR + 0x800, VIRTIO_BLK_T_OUT, 0);
        h.fill(DATA + 0x8000, 512, 0x42);
        let descs = [
            (0, SplitDescriptor::new(HDR + 0x800, 16, NEXT, 1)),
            (1, SplitDescriptor::new(DATA + 0x8000, 512, NEXT, 2)),
            (2, SplitDescriptor::new(STATUS + 0x80, 1, WRITE, 0)),
        ];
        let (vq, mut queue) = raw_queue(&h.mem, &descs, &[0]);
        let beyond = MEM_SIZE as u64 - 8;
        queue.set_used_ring_address(Some(beyond as u32), Some(0));
        assert_eq!(queue.used_ring(), beyond);
        for _ in 0..3 {
            let batch = h.worker.process_queue(&mut queue, &h.mem, &h.limits);
            assert_eq!(batch, Batch::default());
        }
        assert!(matches!(
            h.worker.broken(),
            Some(QueueError::RingOutsideMemory)
        ));
        // The write was never executed: it could not have been reported.
        assert!(h.image()[..512].iter().all(|&b| b == sector_pattern(0)));
        assert_eq!(h.worker.disk.stats.writes.load(Ordering::Relaxed), 0);
        // Reset with a good used ring: the write goes through.
        h.worker.reset();
        queue.set_used_ring_address(Some(vq.used_addr().0 as u32), Some(0));
        drain(&mut h.worker, &h.mem, &h.limits, &mut queue);
        assert_eq!(used_entries(&vq), vec![(0, 1)]);
        assert!(h.image()[..512].iter().all(|&b| b == 0x42));
    }

    #[test]
    fn test_queue_size_zero_or_not_power_of_two_refused_queue_serves() {
        assert!(Queue::new(0).is_err());
        assert!(Queue::new(24).is_err());
        let mut h = Harness::new();
        let descs = good_read(&h, 0, 5);
        let (vq, mut queue) = raw_queue(&h.mem, &descs, &[0]);
        // A frontend asking for size 0 or 24 is refused: the queue keeps its valid size.
        queue.set_size(0);
        queue.set_size(24);
        assert_eq!(queue.size(), QSIZE);
        drain(&mut h.worker, &h.mem, &h.limits, &mut queue);
        assert_good_read_done(&h, used_entries(&vq)[0], 0, 5);
    }

    #[test]
    fn test_buffer_spanning_two_adjacent_regions_ok() {
        let mut h = Harness::new();
        let half = MEM_SIZE / 2;
        h.mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), half),
            (GuestAddress(half as u64), half),
        ])
        .expect("two regions");
        h.header(HDR, VIRTIO_BLK_T_IN, 1);
        // 1024 bytes, the first 256 in the first region, the rest in the second.
        let at = half as u64 - 256;
        assert_eq!(h.run(&[r(HDR, 16), w(at, 1024), w(STATUS, 1)]), 1025);
        assert_eq!(h.status(), STATUS_OK);
        let got = h.read(at, 1024);
        assert!(got[..512].iter().all(|&b| b == sector_pattern(1)));
        assert!(got[512..].iter().all(|&b| b == sector_pattern(2)));
        // A write from the same spanning buffer.
        h.fill(at, 512, 0x33);
        h.header(HDR, VIRTIO_BLK_T_OUT, 10);
        assert_eq!(h.run(&[r(HDR, 16), r(at, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_OK);
        assert!(h.image()[10 * 512..11 * 512].iter().all(|&b| b == 0x33));
    }

    #[test]
    fn test_buffer_spanning_a_hole_between_regions_refused() {
        let mut h = Harness::new();
        let half = MEM_SIZE / 2;
        // [0, half) and [half + 64 KiB, ...): a hole at `half`.
        h.mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), half),
            (GuestAddress(half as u64 + 0x1_0000), half),
        ])
        .expect("two regions");
        h.header(HDR, VIRTIO_BLK_T_IN, 1);
        let at = half as u64 - 256;
        assert_eq!(h.run(&[r(HDR, 16), w(at, 1024), w(STATUS, 1)]), 0);
        assert_eq!(h.status(), 0xff);
        // Buffers in the second region alone are fine.
        let second = half as u64 + 0x2_0000;
        assert_eq!(h.run(&[r(HDR, 16), w(second, 512), w(STATUS, 1)]), 513);
        assert_eq!(h.status(), STATUS_OK);
    }

    /// `count` misaligned 4 KiB O_DIRECT writes of sectors `8 * i`, one chain each.
    fn misaligned_writes(h: &Harness, count: u64) -> Vec<Vec<D>> {
        (0..count)
            .map(|i| {
                let hdr = HDR + i * 0x100;
                h.header(hdr, VIRTIO_BLK_T_OUT, 8 * i);
                let data = DATA + 1 + i * 0x2000;
                h.fill(data, 4096, 0x10 + i as u8);
                vec![r(hdr, 16), r(data, 4096), w(STATUS + i, 1)]
            })
            .collect()
    }

    #[test]
    fn test_direct_bounce_budget_defers_rest_of_batch_in_order() {
        let mut h = Harness::with(false, true, true);
        // Room for two bounced 4 KiB requests at a time.
        h.worker.set_budgets(Budgets {
            bounce: 8192,
            batch_bytes: BATCH_BYTES,
        });
        let chains = misaligned_writes(&h, 5);
        let (used, _) = h.run_chains(&chains);
        assert_eq!(h.rounds, 3, "2 + 2 + 1 requests");
        assert_eq!(used.len(), 5);
        let image = h.image();
        for (i, (head, len)) in used.iter().enumerate() {
            // Ring order is kept across batches.
            assert_eq!((*head, *len), (3 * i as u32, 1));
            assert_eq!(h.read(STATUS + i as u64, 1)[0], STATUS_OK);
            let at = i * 4096;
            assert!(image[at..at + 4096].iter().all(|&b| b == 0x10 + i as u8));
        }
        assert_eq!(h.worker.disk.stats.deferred.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn test_direct_request_larger_than_bounce_budget_ioerr_next_served() {
        let mut h = Harness::with(false, true, true);
        h.worker.set_budgets(Budgets {
            bounce: 2048,
            batch_bytes: BATCH_BYTES,
        });
        let chains = misaligned_writes(&h, 1);
        let (used, _) = h.run_chains(&chains);
        assert_eq!(used, vec![(0, 1)]);
        assert_eq!(h.read(STATUS, 1)[0], STATUS_IOERR);
        let image = h.image();
        for sector in 0..8u64 {
            let at = sector as usize * 512;
            assert!(image[at..at + 512]
                .iter()
                .all(|&b| b == sector_pattern(sector)));
        }
        // An aligned request needs no bounce buffer and goes through.
        h.header(HDR, VIRTIO_BLK_T_IN, 8);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)]), 4097);
        assert_eq!(h.status(), STATUS_OK);
    }

    #[test]
    fn test_batch_byte_budget_splits_batches_nothing_lost() {
        for uring in engines() {
            let mut h = Harness::with(false, false, uring);
            h.worker.set_budgets(Budgets {
                bounce: BOUNCE_BUDGET,
                batch_bytes: 1024,
            });
            let mut chains = Vec::new();
            for i in 0..7u64 {
                let hdr = HDR + i * 0x100;
                h.header(hdr, VIRTIO_BLK_T_IN, i);
                // Request 3 alone is larger than the budget: it runs in a batch of its own.
                let len = if i == 3 { 2048 } else { 512 };
                chains.push(vec![
                    r(hdr, 16),
                    w(DATA + i * 0x1000, len),
                    w(STATUS + i, 1),
                ]);
            }
            let (used, notify) = h.run_chains(&chains);
            assert!(notify);
            // [0 1] [2] [3] [4 5] [6]
            assert_eq!(h.rounds, 5, "uring {uring}");
            assert_eq!(used.len(), 7);
            for (i, (head, len)) in used.iter().enumerate() {
                let i = i as u64;
                let bytes = if i == 3 { 2048 } else { 512 };
                assert_eq!((*head, *len), (3 * i as u32, bytes + 1));
                assert_eq!(h.read(STATUS + i, 1)[0], STATUS_OK);
                assert!(h
                    .read(DATA + i * 0x1000, 512)
                    .iter()
                    .all(|&b| b == sector_pattern(i)));
            }
        }
    }

    #[test]
    fn test_bad_chains_flood_logs_rate_limited() {
        let mut h = Harness::new();
        h.limits.seg_max = 1;
        // Chains refused for one descriptor too many, 8 per batch.
        let chains: Vec<Vec<D>> = (0..8)
            .map(|_| vec![r(HDR, 16), w(DATA, 512), w(DATA, 512), w(STATUS, 1)])
            .collect();
        for _ in 0..3 {
            let (used, _) = h.run_chains(&chains);
            assert!(used.iter().all(|&(_, len)| len == 0));
        }
        let refused = h.worker.disk.stats.refused.load(Ordering::Relaxed);
        assert_eq!(refused, 24);
        // Only the burst was logged (no second went by in between, or one more line).
        assert!(
            h.worker.log.suppressed()
                >= refused - u64::from(bulkhead_device_runtime::loglimit::LOG_BURST) - 1
        );
    }
}
