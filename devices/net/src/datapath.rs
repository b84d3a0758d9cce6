//! The frame path of one queue pair: tap → guest (rx) and guest → tap (tx).
//!
//! Everything the guest controls is bounded: one round handles at most [`BATCH`] frames per
//! direction; a chain is walked at most as far as the queue's size (virtio-queue's chain
//! iterator) and at most [`MAX_FRAME_LEN`] bytes are gathered from it; device-readable
//! descriptors in an rx chain, device-writable ones in a tx chain, addresses outside guest
//! memory and frames shorter than their header are refused (the chain is returned unused, the
//! frame counted as dropped), never a panic. A ring the guest broke (its available index more
//! than a queue ahead, a head index past the queue, rings outside its memory) stops that
//! queue until the driver resets it.
//!
//! rx: a frame is read from the tap into a buffer of [`RX_BUF_LEN`] bytes, then written into
//! the guest's buffers: one chain, or with `VIRTIO_NET_F_MRG_RXBUF` as many chains as it takes,
//! their count in the header's `num_buffers`. When the guest has too few buffers the frame
//! stays in the buffer and the tap is not read again until the guest kicks the rx queue.
//!
//! tx: a chain's bytes (the 12-byte `virtio_net_hdr_v1`, then the frame) are written to the
//! tap as one frame, straight from guest memory, several frames per system call where the pair
//! has a [`WriteBatch`] ([`crate::writebatch`]): the guest's header is the tap's vnet header,
//! so its checksum and segmentation offloads (CSUM, HOST_TSO4/6, HOST_ECN, HOST_UFO) cross as
//! they are.

use std::io;
use std::sync::Mutex;
use std::time::Duration;

pub use bulkhead_device_runtime::loglimit::LogLimiter;

use bulkhead_device_runtime::iovec::{push_guest_iovecs, IovecError};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::readahead::{NoFrame, ReadAhead, Slot};
use crate::stats::{add, Stats};
use crate::tap::{Tap, VNET_HDR_LEN};
use crate::writebatch::{WriteBatch, MAX_FRAMES};
use bulkhead_device_runtime::rate::RateLimiter;
use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE};

/// Frames per direction in one round, before the worker looks at its other events.
pub const BATCH: usize = 64;
/// The largest frame (without vnet header) the tap hands or takes: a 64 KiB GSO segment with
/// its Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65536 + 14 + 4;
/// The rx buffer: header and the largest frame.
pub const RX_BUF_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The header without `num_buffers` (legacy drivers without VERSION_1 or MRG_RXBUF).
pub const LEGACY_HDR_LEN: usize = 10;
/// `flags` of the header: the guest takes checksum state only with GUEST_CSUM.
const HDR_FLAGS: usize = 0;
/// `gso_type` of the header.
const HDR_GSO_TYPE: usize = 1;
/// `csum_start` and `csum_offset` of the header (little-endian: VERSION_1, or an arm guest's
/// legacy header).
const HDR_CSUM_START: usize = 6;
const HDR_CSUM_OFFSET: usize = 8;
/// Where a UDP header keeps its checksum (a UDP checksum of 0 is sent as 0xffff).
const UDP_CSUM_OFFSET: usize = 6;

/// What the guest negotiated that the frame path needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The guest's header: 12 bytes (VERSION_1 or MRG_RXBUF), else 10.
    pub hdr_len: usize,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span chains.
    pub mrg_rxbuf: bool,
    /// Checksum offload towards the guest is on (GUEST_CSUM and TUN_F_CSUM set): the header's
    /// flags are passed on; otherwise they are cleared.
    pub guest_csum: bool,
}

impl Default for Negotiated {
    fn default() -> Negotiated {
        Negotiated {
            hdr_len: VNET_HDR_LEN,
            mrg_rxbuf: false,
            guest_csum: false,
        }
    }
}

/// Why a queue stopped being processed (a driver bug or attack; it resumes after a reset).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot read the available ring")]
    AvailRing(#[source] virtio_queue::Error),
    #[error("descriptor head {0} is past the queue")]
    HeadIndex(u16),
    #[error("cannot add an entry to the used ring")]
    AddUsed(#[source] virtio_queue::Error),
    #[error("cannot update the notification settings")]
    Notification(#[source] virtio_queue::Error),
}

/// Why a direction's round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Nothing more to do (tap empty, or no frame from the guest).
    Idle,
    /// rx: the guest has too few buffers; wait for its kick.
    NoBuffers,
    /// The rate limiter refused: try again after this long.
    Throttled(Duration),
    /// tx: the tap cannot take more now (EAGAIN); wait until it is writable.
    TapFull,
    /// [`BATCH`] frames done; more may be waiting.
    Budget,
}

/// What one round did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Round {
    /// Used entries were added: the guest may need an interrupt.
    pub used: bool,
    pub stop: Stop,
}

/// The rx side of a pair: the frame read from the tap and not yet placed.
pub struct RxState {
    /// Where frames are read one `read` at a time (no read-ahead).
    buf: Box<[u8]>,
    /// Frames read from the tap in batches (see [`crate::readahead`]); the pending frame is
    /// in its buffer `slot` then.
    ahead: Option<ReadAhead>,
    slot: Option<Slot>,
    /// Bytes of the pending frame (0: none).
    pending: usize,
    /// The pending frame was already counted by the rate limiter.
    charged: bool,
    /// The pending frame's header was adapted to the guest's (flags, legacy size).
    shaped: bool,
    /// Where the frame as the guest takes it starts in `buf` (2 with a legacy header).
    offset: usize,
    /// Notifications are enabled (waiting for buffers).
    notify: bool,
    /// Chains taken for the frame being placed: (head, bytes written).
    placed: Vec<(u16, u32)>,
    pub log: LogLimiter,
}

impl Default for RxState {
    fn default() -> RxState {
        RxState {
            buf: vec![0u8; RX_BUF_LEN].into_boxed_slice(),
            ahead: None,
            slot: None,
            pending: 0,
            charged: false,
            shaped: false,
            offset: 0,
            notify: true,
            placed: Vec::new(),
            log: LogLimiter::default(),
        }
    }
}

impl RxState {
    /// An rx side that reads the tap in batches through `ahead` (see [`crate::readahead`]).
    pub fn with_read_ahead(ahead: ReadAhead) -> RxState {
        RxState {
            // Frames land in the read-ahead's buffers: this one is not used.
            buf: Box::default(),
            ahead: Some(ahead),
            ..RxState::default()
        }
    }

    /// Forgets the pending frame and those read ahead (queue reset); returns how many frames
    /// that dropped.
    pub fn reset(&mut self) -> usize {
        let mut dropped = usize::from(self.pending > 0);
        if let Some(ahead) = self.ahead.as_mut() {
            dropped += ahead.clear();
        }
        self.pending = 0;
        self.slot = None;
        self.charged = false;
        self.notify = true;
        self.placed.clear();
        dropped
    }

    /// Whether a frame waits for guest buffers.
    pub fn has_pending(&self) -> bool {
        self.pending > 0
    }

    /// The pending frame's buffer.
    fn frame_buf(&mut self) -> &mut [u8] {
        match (self.ahead.as_mut(), self.slot.as_ref()) {
            (Some(ahead), Some(slot)) => ahead.buf(slot),
            _ => &mut self.buf,
        }
    }

    /// The pending frame's buffer, to read.
    fn frame(&self) -> &[u8] {
        match (self.ahead.as_ref(), self.slot.as_ref()) {
            (Some(ahead), Some(slot)) => ahead.frame(slot),
            _ => &self.buf,
        }
    }

    /// Reads the next frame from the tap into [`RxState::frame_buf`]: its length with the
    /// header. `WouldBlock` when the tap is empty.
    fn read_frame(&mut self, tap: &Tap) -> io::Result<usize> {
        let Some(ahead) = self.ahead.as_mut() else {
            self.slot = None;
            return tap.read(&mut self.buf);
        };
        match ahead.next_frame() {
            Ok((slot, n)) => {
                self.slot = Some(slot);
                Ok(n)
            }
            Err(NoFrame::Empty) => Err(io::ErrorKind::WouldBlock.into()),
            Err(NoFrame::Tap(e)) => Err(e),
            Err(NoFrame::Unsupported) => {
                self.log.warn(format_args!(
                    "this kernel's tap takes no RWF_NOWAIT reads: reading one frame at a time"
                ));
                self.ahead = None;
                self.read_one_at_a_time(tap)
            }
            Err(NoFrame::Ring(e)) => {
                self.log.warn(format_args!(
                    "reading the tap in batches failed ({e}); reading one frame at a time"
                ));
                if let Some(ahead) = self.ahead.take() {
                    // The kernel may still hold the ring's buffers: never unmap them.
                    ahead.abandon();
                }
                self.read_one_at_a_time(tap)
            }
        }
    }

    /// Falls back from batched reads (`ahead` already gone) and reads the next frame.
    fn read_one_at_a_time(&mut self, tap: &Tap) -> io::Result<usize> {
        self.buf = vec![0u8; RX_BUF_LEN].into_boxed_slice();
        self.slot = None;
        tap.read(&mut self.buf)
    }
}

/// The tx side of a pair.
pub struct TxState {
    buf: Box<[u8]>,
    /// Frames written to the tap in batches (see [`crate::writebatch`]); none between rounds.
    batch: Option<WriteBatch>,
    pub log: LogLimiter,
}

impl Default for TxState {
    fn default() -> TxState {
        TxState {
            // Room for a legacy header's two missing bytes in front.
            buf: vec![0u8; RX_BUF_LEN].into_boxed_slice(),
            batch: None,
            log: LogLimiter::default(),
        }
    }
}

impl TxState {
    /// A tx side that writes frames to the tap in batches through `batch`.
    pub fn with_write_batch(batch: WriteBatch) -> TxState {
        TxState {
            batch: Some(batch),
            ..TxState::default()
        }
    }

    /// Whether frames go to the tap in batches (io_uring there, and the tap takes them).
    pub fn batched(&self) -> bool {
        self.batch.is_some()
    }
}

/// How a frame went into the guest's buffers.
enum Placement {
    Done,
    /// Too few buffers now; `seen` is the available index they were counted up to.
    NoBuffers {
        seen: u16,
    },
    /// It can never fit (larger than a single buffer without MRG_RXBUF, or than the ring).
    TooLarge,
    /// A chain was malformed: it and the chains taken before it were returned unused.
    BadChain,
}

fn rewind(q: &mut Queue, to: u16) {
    q.set_next_avail(to);
}

/// Places `frame` (header included) into the guest's rx buffers.
fn place(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &[u8],
    neg: &Negotiated,
    placed: &mut Vec<(u16, u32)>,
) -> Result<Placement, QueueError> {
    let start = q.next_avail();
    let size = q.size();
    placed.clear();
    let mut off = 0usize;
    let mut num_buffers_at: [Option<GuestAddress>; 2] = [None, None];
    let mut bad = false;
    {
        let mut iter = q.iter(mem).map_err(QueueError::AvailRing)?;
        while off < frame.len() {
            let Some(chain) = iter.next() else {
                break;
            };
            let head = chain.head_index();
            if head >= size {
                return Err(QueueError::HeadIndex(head));
            }
            let mut written = 0u32;
            let first = placed.is_empty();
            for desc in chain {
                if !desc.is_write_only() {
                    bad = true;
                    break;
                }
                let n = (desc.len() as usize).min(frame.len() - off);
                if n == 0 {
                    continue;
                }
                let Some(bytes) = frame.get(off..off + n) else {
                    bad = true;
                    break;
                };
                if mem.write_slice(bytes, desc.addr()).is_err() {
                    bad = true;
                    break;
                }
                if first && neg.hdr_len == VNET_HDR_LEN {
                    for (k, at) in num_buffers_at.iter_mut().enumerate() {
                        let o = NUM_BUFFERS_OFFSET + k;
                        if (off..off + n).contains(&o) {
                            *at = desc.addr().checked_add((o - off) as u64);
                        }
                    }
                }
                off += n;
                written += n as u32;
                if off == frame.len() {
                    break;
                }
            }
            placed.push((head, written));
            // The header (with `num_buffers`) must fit the first buffer.
            if first && off < frame.len() && (written as usize) < neg.hdr_len {
                bad = true;
            }
            if bad || !neg.mrg_rxbuf || placed.len() >= usize::from(size) {
                break;
            }
        }
    }
    if bad {
        for &(head, _) in placed.iter() {
            q.add_used(mem, head, 0).map_err(QueueError::AddUsed)?;
        }
        return Ok(Placement::BadChain);
    }
    if off < frame.len() {
        let seen = start.wrapping_add(placed.len() as u16);
        rewind(q, start);
        if !neg.mrg_rxbuf && !placed.is_empty() || placed.len() >= usize::from(size) {
            return Ok(Placement::TooLarge);
        }
        return Ok(Placement::NoBuffers { seen });
    }
    if placed.len() > 1 {
        let count = (placed.len() as u16).to_le_bytes();
        for (at, byte) in num_buffers_at.iter().zip(count) {
            if let Some(at) = at {
                // Written a moment ago, so it is mapped.
                let _ = mem.write_obj(byte, *at);
            }
        }
    }
    for &(head, len) in placed.iter() {
        q.add_used(mem, head, len).map_err(QueueError::AddUsed)?;
    }
    Ok(Placement::Done)
}

/// Arms notifications for "the guest added buffers past `seen`" and says whether it already
/// did. With EVENT_IDX the avail event index must be `seen`, not the rewound next index, or the
/// guest would not kick for the buffers it adds after those we could not use.
fn wait_for_buffers(q: &mut Queue, mem: &GuestMemoryMmap, seen: u16) -> Result<bool, QueueError> {
    let next = q.next_avail();
    q.set_next_avail(seen);
    let more = q.enable_notification(mem);
    q.set_next_avail(next);
    more.map_err(QueueError::Notification)
}

/// One rx round: reads frames from the tap and places them in the guest's buffers.
pub fn process_rx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: &Tap,
    rx: &mut RxState,
    neg: &Negotiated,
    limiter: Option<&Mutex<RateLimiter>>,
    stats: &Stats,
) -> Result<Round, QueueError> {
    let mut round = Round {
        used: false,
        stop: Stop::Budget,
    };
    if rx.notify {
        q.disable_notification(mem)
            .map_err(QueueError::Notification)?;
        rx.notify = false;
    }
    if let Some(ahead) = rx.ahead.as_mut() {
        ahead.begin_round();
    }
    let mut frames = 0;
    while frames < BATCH {
        if rx.pending == 0 {
            match rx.read_frame(tap) {
                Ok(n) if n >= VNET_HDR_LEN => {
                    rx.pending = n;
                    rx.charged = false;
                    rx.shaped = false;
                }
                Ok(0) => {
                    round.stop = Stop::Idle;
                    return Ok(round);
                }
                Ok(_) => {
                    add(&stats.rx_dropped, 1);
                    frames += 1;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    round.stop = Stop::Idle;
                    return Ok(round);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    rx.log.warn(format_args!("cannot read the tap: {e}"));
                    round.stop = Stop::Idle;
                    return Ok(round);
                }
            }
        }
        let frame_len = (rx.pending - VNET_HDR_LEN) as u64;
        if !rx.charged {
            if let Some(limiter) = limiter {
                let mut l = limiter.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(wait) = l.consume(frame_len) {
                    add(&stats.rx_throttled, 1);
                    round.stop = Stop::Throttled(wait);
                    return Ok(round);
                }
            }
            rx.charged = true;
        }
        // The header as the guest takes it (once per frame: a retry finds it done).
        if !rx.shaped {
            let buf = rx.frame_buf();
            if !neg.guest_csum {
                if let Some(flags) = buf.get_mut(HDR_FLAGS) {
                    *flags = 0;
                }
            }
            let offset = if neg.hdr_len == LEGACY_HDR_LEN {
                // Drop `num_buffers`: the 10-byte header moves up against the frame.
                if buf.len() >= VNET_HDR_LEN {
                    buf.copy_within(..LEGACY_HDR_LEN, VNET_HDR_LEN - LEGACY_HDR_LEN);
                }
                VNET_HDR_LEN - LEGACY_HDR_LEN
            } else {
                if let Some(nb) = buf.get_mut(NUM_BUFFERS_OFFSET..VNET_HDR_LEN) {
                    nb.copy_from_slice(&1u16.to_le_bytes());
                }
                0
            };
            rx.offset = offset;
            rx.shaped = true;
        }
        // `placed` is lent out so the frame can be borrowed from `rx` (taking a Vec does not
        // allocate); it goes back before anything below can return.
        let mut placed = std::mem::take(&mut rx.placed);
        let frame = rx.frame().get(rx.offset..rx.pending).unwrap_or_default();
        let placement = place(q, mem, frame, neg, &mut placed);
        rx.placed = placed;
        match placement? {
            Placement::Done => {
                add(&stats.rx_packets, 1);
                add(&stats.rx_bytes, frame_len);
                round.used = true;
                rx.pending = 0;
                rx.charged = false;
            }
            Placement::NoBuffers { seen } => {
                if wait_for_buffers(q, mem, seen)? {
                    // Buffers arrived meanwhile: go round again (notifications stay on until
                    // the next round starts).
                    rx.notify = true;
                    q.disable_notification(mem)
                        .map_err(QueueError::Notification)?;
                    rx.notify = false;
                    continue;
                }
                rx.notify = true;
                round.stop = Stop::NoBuffers;
                return Ok(round);
            }
            Placement::TooLarge => {
                rx.log.warn(format_args!(
                    "dropping a {frame_len}-byte frame: larger than the guest's receive buffers"
                ));
                add(&stats.rx_dropped, 1);
                rx.pending = 0;
                rx.charged = false;
            }
            Placement::BadChain => {
                rx.log
                    .warn(format_args!("rx: malformed receive buffer; frame dropped"));
                add(&stats.bad_chains, 1);
                add(&stats.rx_dropped, 1);
                round.used = true;
                rx.pending = 0;
                rx.charged = false;
            }
        }
        frames += 1;
    }
    Ok(round)
}

/// Most pieces one frame is written in (the kernel's UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;

/// Why a tx chain cannot be written straight from guest memory.
enum Gather {
    /// Malformed: a device-writable descriptor, memory outside the guest's, or too long.
    Bad,
    /// More pieces than one writev takes: copy it instead.
    TooManyPieces,
}

/// The chain's bytes as iovecs into guest memory; their total length.
fn gather(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    iov: &mut Vec<libc::iovec>,
) -> Result<usize, Gather> {
    iov.clear();
    let mut len = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err(Gather::Bad);
        }
        let n = desc.len() as usize;
        len += n;
        if len > RX_BUF_LEN {
            return Err(Gather::Bad);
        }
        push_guest_iovecs(mem, desc.addr(), n, iov, MAX_IOVECS).map_err(|e| match e {
            IovecError::OutsideMemory => Gather::Bad,
            IovecError::TooManyPieces => Gather::TooManyPieces,
        })?;
    }
    Ok(len)
}

/// One tx round: sends the guest's frames to the tap (in batches where the pair has a
/// [`WriteBatch`]: frames written straight from guest memory wait in it until it is full, the
/// round ends, or a frame that needs anything else comes; see [`crate::writebatch`]).
pub fn process_tx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: &Tap,
    tx: &mut TxState,
    neg: &Negotiated,
    limiter: Option<&Mutex<RateLimiter>>,
    stats: &Stats,
) -> Result<Round, QueueError> {
    let mut round = Round {
        used: false,
        stop: Stop::Budget,
    };
    let size = q.size();
    // A legacy 10-byte header is widened to the tap's 12 bytes in place.
    let pad = VNET_HDR_LEN - neg.hdr_len;
    // Pieces of the frame being sent, pointing into guest memory (valid while `mem` is held).
    let mut iov: Vec<libc::iovec> = Vec::new();
    let out = TxOut {
        tap,
        limiter,
        stats,
    };
    for _ in 0..BATCH {
        let start = q.next_avail();
        let chain = {
            let mut iter = q.iter(mem).map_err(QueueError::AvailRing)?;
            iter.next()
        };
        let Some(chain) = chain else {
            match out.flush(q, mem, tx, &mut round)? {
                // Cancelled frames went back to the ring: take them again.
                Flushed::Rewound => continue,
                Flushed::Stopped(stop) => round.stop = stop,
                Flushed::Sent => round.stop = Stop::Idle,
            }
            return Ok(round);
        };
        let head = chain.head_index();
        if head >= size {
            return Err(QueueError::HeadIndex(head));
        }
        // An injected `corrupt=N` (docs/fault-injection.md) picks among the frames that are
        // not segmentation-offloaded; a picked frame is corrupted in the buffer, never in
        // guest memory.
        let corrupt = bulkhead_device_runtime::fault::corrupt_armed()
            && chain.clone().next().is_some_and(|d| {
                let mut gso = [0u8; 2];
                !d.is_write_only()
                    && mem.read_slice(&mut gso, d.addr()).is_ok()
                    && u32::from(gso[HDR_GSO_TYPE]) == VIRTIO_NET_HDR_GSO_NONE
            })
            && bulkhead_device_runtime::fault::frame_corrupted();
        // With the tap's own header size the frame goes from guest memory to the tap in one
        // writev; otherwise (a legacy header to widen, or more pieces than writev takes, or a
        // frame to corrupt) it is gathered into the buffer first.
        let mut len = 0usize;
        let mut bad = false;
        let mut direct = false;
        if pad == 0 && !corrupt {
            match gather(chain.clone(), mem, &mut iov) {
                Ok(n) => {
                    len = n;
                    direct = true;
                }
                Err(Gather::Bad) => bad = true,
                Err(Gather::TooManyPieces) => {}
            }
        }
        let batched = direct
            && !bad
            && len >= neg.hdr_len
            && tx.batch.as_ref().is_some_and(|b| b.has_room(iov.len()));
        if !batched {
            // Everything but a frame that joins the batch is handled on its own, after the
            // frames before it: a chain goes back to the ring only with all those after it.
            match out.flush(q, mem, tx, &mut round)? {
                Flushed::Sent => {}
                Flushed::Rewound => continue,
                Flushed::Stopped(stop) => {
                    round.stop = stop;
                    return Ok(round);
                }
            }
        }
        if !direct && !bad {
            for desc in chain {
                if desc.is_write_only() {
                    bad = true;
                    break;
                }
                let n = desc.len() as usize;
                let Some(dst) = tx.buf.get_mut(pad + len..pad + len + n) else {
                    bad = true;
                    break;
                };
                if mem.read_slice(dst, desc.addr()).is_err() {
                    bad = true;
                    break;
                }
                len += n;
            }
        }
        if bad || len < neg.hdr_len {
            tx.log
                .warn(format_args!("tx: malformed frame of {len} bytes refused"));
            add(&stats.bad_chains, 1);
            add(&stats.tx_dropped, 1);
            q.add_used(mem, head, 0).map_err(QueueError::AddUsed)?;
            round.used = true;
            continue;
        }
        if pad > 0 && !direct {
            tx.buf.copy_within(pad..pad + LEGACY_HDR_LEN, 0);
            if let Some(nb) = tx.buf.get_mut(LEGACY_HDR_LEN..VNET_HDR_LEN) {
                nb.fill(0);
            }
        }
        let total = len + pad;
        let frame_len = (total - VNET_HDR_LEN) as u64;
        if let Some(limiter) = limiter {
            let mut l = limiter.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(wait) = l.consume(frame_len) {
                drop(l);
                // The frames before it go first; it stays in the ring.
                match out.flush(q, mem, tx, &mut round)? {
                    Flushed::Sent => rewind(q, start),
                    // Already put back, from an earlier chain.
                    Flushed::Rewound | Flushed::Stopped(_) => {}
                }
                add(&stats.tx_throttled, 1);
                round.stop = Stop::Throttled(wait);
                return Ok(round);
            }
        }
        // An injected fault (docs/fault-injection.md): the frame is lost, as on a wire.
        if bulkhead_device_runtime::fault::frame_dropped() {
            // Its chain is returned ahead of the frames before it only once they are out.
            match out.flush(q, mem, tx, &mut round)? {
                Flushed::Sent => {}
                // It went back to the ring with them: taken (and charged) again.
                Flushed::Rewound => {
                    out.refund(frame_len);
                    continue;
                }
                Flushed::Stopped(stop) => {
                    out.refund(frame_len);
                    round.stop = stop;
                    return Ok(round);
                }
            }
            add(&stats.tx_dropped, 1);
            q.add_used(mem, head, 0).map_err(QueueError::AddUsed)?;
            round.used = true;
            continue;
        }
        if batched {
            // Room was checked above: the push cannot fail.
            if let Some(batch) = tx.batch.as_mut().filter(|b| b.has_room(iov.len())) {
                batch.push(head, start, frame_len, &iov);
                if batch.is_full() {
                    match out.flush(q, mem, tx, &mut round)? {
                        Flushed::Sent | Flushed::Rewound => {}
                        Flushed::Stopped(stop) => {
                            round.stop = stop;
                            return Ok(round);
                        }
                    }
                }
                continue;
            }
        }
        if corrupt {
            if let Some(frame) = tx.buf.get_mut(..total) {
                if corrupt_frame(frame) {
                    add(&stats.tx_corrupted, 1);
                }
            }
        }
        let written = if direct {
            tap.writev(&iov)
        } else {
            tap.write(tx.buf.get(..total).unwrap_or_default())
        };
        if let Err(e) = &written {
            if e.kind() == io::ErrorKind::WouldBlock {
                out.refund(frame_len);
                rewind(q, start);
                round.stop = Stop::TapFull;
                return Ok(round);
            }
        }
        out.complete(q, mem, tx, head, frame_len, written.map(drop), &mut round)?;
    }
    if let Flushed::Stopped(stop) = out.flush(q, mem, tx, &mut round)? {
        round.stop = stop;
    }
    Ok(round)
}

/// Where a written batch (`results`: bytes or `-errno`, by frame) stopped going out: the first
/// frame left unsent (refused for room with `EAGAIN`, by a kernel whose tap takes no
/// `RWF_NOWAIT` writes with `EOPNOTSUPP`, or `ECANCELED`: no result from a ring that failed),
/// and whether the batch goes back to the ring from there (true: no frame after it went out)
/// or its unsent frames are dropped (false: sending them now would put them after a later
/// one). `None` when every frame was sent or refused for good.
fn unsent_plan(results: &[i32]) -> Option<(usize, bool)> {
    let unsent = |r: i32| r == -libc::EAGAIN || r == -libc::EOPNOTSUPP || r == -libc::ECANCELED;
    let first = results.iter().position(|&r| unsent(r))?;
    let later_sent = results
        .get(first + 1..)
        .unwrap_or_default()
        .iter()
        .any(|&r| r >= 0);
    Some((first, !later_sent))
}

/// What [`TxOut::flush`] did with the batch.
enum Flushed {
    /// Every frame was sent or dropped (or there were none): the ring is where it was.
    Sent,
    /// Frames after one the tap refused for good went back to the ring (cancelled unsent),
    /// or batching stopped: the round takes them again.
    Rewound,
    /// The tap is full: the frame it refused and those after it went back to the ring.
    Stopped(Stop),
}

/// Where a tx round's frames go, and what it counts.
struct TxOut<'a> {
    tap: &'a Tap,
    limiter: Option<&'a Mutex<RateLimiter>>,
    stats: &'a Stats,
}

impl TxOut<'_> {
    /// Gives a frame's tokens back (it goes back to the ring).
    fn refund(&self, frame_len: u64) {
        if let Some(limiter) = self.limiter {
            limiter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refund(frame_len);
        }
    }

    /// Counts frame `head` (`frame_len` bytes) as sent or, on an error the tap gave for it,
    /// lost, and returns its chain to the guest.
    #[allow(clippy::too_many_arguments)]
    fn complete(
        &self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        tx: &mut TxState,
        head: u16,
        frame_len: u64,
        written: io::Result<()>,
        round: &mut Round,
    ) -> Result<(), QueueError> {
        match written {
            Ok(()) => {
                add(&self.stats.tx_packets, 1);
                add(&self.stats.tx_bytes, frame_len);
            }
            Err(e) => {
                // EIO when the tap is down, EINVAL for a header the tap refuses: the frame is
                // lost, as on a wire.
                tx.log
                    .warn(format_args!("tx: the tap refused a frame: {e}"));
                add(&self.stats.tx_dropped, 1);
            }
        }
        q.add_used(mem, head, 0).map_err(QueueError::AddUsed)?;
        round.used = true;
        Ok(())
    }

    /// Writes the frames waiting in the batch, in order, and returns their chains to the guest;
    /// a frame the tap could not take now, and every frame after it, goes back to the ring
    /// (see [`unsent_plan`]), and batching stops for the pair.
    fn flush(
        &self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        tx: &mut TxState,
        round: &mut Round,
    ) -> Result<Flushed, QueueError> {
        let Some(batch) = tx.batch.as_mut() else {
            return Ok(Flushed::Sent);
        };
        if batch.is_empty() {
            return Ok(Flushed::Sent);
        }
        let frames = batch.frames().to_vec();
        let mut results: [i32; MAX_FRAMES] = [-libc::ECANCELED; MAX_FRAMES];
        let mut ring_failed = None;
        if let [lone] = frames.as_slice() {
            // One frame gains nothing from the ring: one writev.
            results[0] = match self.tap.writev(batch.pieces(lone)) {
                Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            };
        } else {
            if let Err(e) = batch.submit() {
                ring_failed = Some(e);
            }
            for (i, r) in results.iter_mut().enumerate().take(frames.len()) {
                *r = batch.result(i);
            }
        }
        batch.clear();
        if let Some(e) = &ring_failed {
            tx.log.warn(format_args!(
                "writing to the tap in batches failed ({e}); writing one frame at a time"
            ));
            if let Some(batch) = tx.batch.take() {
                // A write may still be in flight from its iovecs: never free them.
                batch.abandon();
            }
        }
        let result = |i: usize| results.get(i).copied().unwrap_or(-libc::EIO);
        let plan = unsent_plan(results.get(..frames.len()).unwrap_or_default());
        let rewind_at = plan.and_then(|(u, rewind)| rewind.then_some(u));
        for (i, frame) in frames.iter().enumerate() {
            if rewind_at == Some(i) {
                for f in frames.get(i..).unwrap_or_default() {
                    self.refund(f.len);
                }
                rewind(q, frame.start);
                break;
            }
            let res = result(i);
            if res >= 0 && frames.len() > 1 {
                add(&self.stats.tx_batched, 1);
            }
            let written = if res >= 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-res))
            };
            self.complete(q, mem, tx, frame.head, frame.len, written, round)?;
        }
        let Some((u, _)) = plan else {
            return Ok(Flushed::Sent);
        };
        let refused = result(u);
        if refused == -libc::EAGAIN {
            tx.log.warn(format_args!(
                "the tap's send buffer is limited and was full: writing one frame at a time"
            ));
        } else if refused == -libc::EOPNOTSUPP {
            tx.log.warn(format_args!(
                "this kernel's tap takes no RWF_NOWAIT writes: writing one frame at a time"
            ));
        }
        tx.batch = None;
        Ok(match (rewind_at, refused == -libc::EAGAIN) {
            (None, _) => Flushed::Sent,
            (Some(_), true) => Flushed::Stopped(Stop::TapFull),
            (Some(_), false) => Flushed::Rewound,
        })
    }
}

/// `corrupt=N` (docs/fault-injection.md): flips the last byte of `buf` (the tap's header, then
/// a frame that is not segmentation-offloaded) so that the receiver's checksum catches it. A
/// checksum left to offload (NEEDS_CSUM: the field holds the pseudo-header's sum) is completed
/// first and the flag cleared, so that nothing downstream computes it over the flipped byte.
/// False (nothing changed) for a frame too short or whose checksum offsets point outside it.
pub fn corrupt_frame(buf: &mut [u8]) -> bool {
    if buf.len() <= VNET_HDR_LEN {
        return false;
    }
    if u32::from(buf[HDR_FLAGS]) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        let at = |i: usize| usize::from(u16::from_le_bytes([buf[i], buf[i + 1]]));
        let start = VNET_HDR_LEN + at(HDR_CSUM_START);
        let offset = at(HDR_CSUM_OFFSET);
        let field = start + offset;
        if field + 2 > buf.len() {
            return false;
        }
        let mut sum = internet_sum(&buf[start..]);
        if sum == 0 && offset == UDP_CSUM_OFFSET {
            sum = 0xffff;
        }
        buf[field..field + 2].copy_from_slice(&sum.to_be_bytes());
        buf[HDR_FLAGS] &= !(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8);
    }
    let last = buf.len() - 1;
    buf[last] ^= 0xff;
    true
}

/// The Internet checksum (RFC 1071) of `data`: the complement of the ones' complement sum of
/// its 16-bit big-endian words.
fn internet_sum(data: &[u8]) -> u16 {
    let mut sum: u64 = data
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Disables notifications, runs `round`, re-enables them and goes round again while frames
/// arrived meanwhile, as long as `round` ended idle (the tx pattern with EVENT_IDX).
pub fn with_notifications_off(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    mut round: impl FnMut(&mut Queue) -> Result<Round, QueueError>,
) -> Result<Round, QueueError> {
    let mut used = false;
    loop {
        q.disable_notification(mem)
            .map_err(QueueError::Notification)?;
        let r = round(q)?;
        used |= r.used;
        if r.stop != Stop::Idle {
            // Budget: the caller comes back; throttled / tap full: it waits for a timer or the
            // tap, and must see new frames then.
            if r.stop != Stop::Budget {
                q.enable_notification(mem)
                    .map_err(QueueError::Notification)?;
            }
            return Ok(Round { used, stop: r.stop });
        }
        if !q
            .enable_notification(mem)
            .map_err(QueueError::Notification)?
        {
            return Ok(Round { used, stop: r.stop });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
