//! Writing guest frames to the tap several at a time: a batch of writes, each with
//! `RWF_NOWAIT`, in one `io_uring_enter`.
//!
//! Each `write` on a tap queue takes one frame, so at 64-byte frames the system call around
//! each (entry, the seccomp filter, `fdget`, the iovec import, exit) costs a good part of what
//! the tap's own work does (the tx side of [`crate::readahead`]'s reasoning). The tx path
//! gathers up to [`MAX_FRAMES`] frames of a round, each as iovecs straight into guest memory,
//! and submits them together:
//!
//! - **Nothing stays in flight.** With `RWF_NOWAIT` a write completes inside the call, sent or
//!   refused with `EAGAIN` (the tap's send buffer is full); it is never left to a kernel
//!   worker. A tap whose kernel does not take `RWF_NOWAIT` (tun marks its files `FMODE_NOWAIT`
//!   only in newer kernels) refuses the first write with `EOPNOTSUPP` before reading a byte,
//!   and the tx path goes back to one `writev` per frame.
//! - **Order is kept.** The writes are issued in submission order, each inside the call. The
//!   only refusal that leaves a frame for later is `EAGAIN`, when the tap's send buffer is
//!   full, and tun's send buffer is unlimited (`INT_MAX`) unless someone set it with
//!   `TUNSETSNDBUF`: a pair whose tap has a limited one at start writes one frame per `writev`
//!   (`backend`), and a batch that meets `EAGAIN` anyway ends batching for the pair: if no
//!   frame after the refused one went out, it and those after it go back to the available ring
//!   (sent later, in order); if one did, the refused frames are dropped, as a full transmit
//!   queue drops them, rather than sent out of order. (Linking the writes, `IOSQE_IO_LINK`,
//!   would keep order through `EAGAIN` too, but each linked write is issued from task work
//!   after the one before it completes: measured, that cost more than the system calls it
//!   saved.)
//! - **A lone frame is one `writev`**: a batch of one gains nothing from the ring.
//!
//! The ring is created before the seccomp filter (which allows `io_uring_enter` and neither
//! `io_uring_setup` nor `io_uring_register`), disabled until its restrictions are in place: it
//! accepts `IORING_OP_WRITE` and `IORING_OP_WRITEV` and nothing else, each on the pair's tap
//! (registered with the ring, `crate::uring`), so it cannot open files or sockets past the
//! filter, nor write to any other descriptor. Where io_uring is not
//! available the tx path writes one frame per `writev`, as it always could.

use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

use io_uring::squeue::Flags;
use io_uring::{opcode, IoUring};

use crate::tap::Tap;

/// Most frames in one batch.
pub const MAX_FRAMES: usize = 16;
/// Most pieces (iovecs) of all the frames in one batch: a frame that would pass it starts the
/// next batch (one frame alone may have up to the kernel's UIO_MAXIOV, 1024).
pub const MAX_BATCH_IOVECS: usize = 1024;

/// A frame of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Its chain's head.
    pub head: u16,
    /// The available ring's index before its chain was taken: where to put it back.
    pub start: u16,
    /// Its bytes without the vnet header (statistics and the rate limiter).
    pub len: u64,
    /// Its pieces in the batch's iovecs.
    iov: Range<usize>,
}

/// The batch's frames and their pieces, before and after a submission.
pub struct WriteBatch {
    ring: IoUring,
    /// The pieces of every frame, in order. Its capacity is reserved once and never passed, so
    /// the kernel reads the iovecs where they were when the batch was submitted.
    iovecs: Vec<libc::iovec>,
    frames: Vec<Frame>,
    /// The last submission's results, by frame: bytes written or `-errno`.
    results: [i32; MAX_FRAMES],
}

// SAFETY: the only part that is not Send is the iovec pointers into guest memory, and the
// batch holds them only inside one tx round (`datapath::process_tx` submits or forgets them
// before it returns), on the pair's worker thread under the pair's lock.
unsafe impl Send for WriteBatch {}

impl WriteBatch {
    /// A ring for batches of writes to `tap` (and no other descriptor); an error (the reason,
    /// for the log) where io_uring is not available.
    pub fn new(tap: &Tap) -> io::Result<WriteBatch> {
        let ring = crate::uring::restricted_ring(
            MAX_FRAMES as u32,
            &[
                (opcode::Write::CODE, "IORING_OP_WRITE"),
                (opcode::Writev::CODE, "IORING_OP_WRITEV"),
            ],
            tap.as_raw_fd(),
        )?;
        Ok(WriteBatch {
            ring,
            iovecs: Vec::with_capacity(MAX_BATCH_IOVECS),
            frames: Vec::with_capacity(MAX_FRAMES),
            results: [0; MAX_FRAMES],
        })
    }

    /// Whether a frame of `pieces` iovecs can join the batch.
    pub fn has_room(&self, pieces: usize) -> bool {
        self.frames.len() < MAX_FRAMES
            && pieces > 0
            && self.iovecs.len().saturating_add(pieces) <= MAX_BATCH_IOVECS
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.frames.len() >= MAX_FRAMES
    }

    /// The frames of the batch, in order.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// The iovecs of `frame`.
    pub fn pieces(&self, frame: &Frame) -> &[libc::iovec] {
        self.iovecs.get(frame.iov.clone()).unwrap_or_default()
    }

    /// Adds a frame (its chain `head`, taken at available index `start`, `len` bytes without
    /// the header) written from `pieces`; false (nothing added) without room for it
    /// ([`WriteBatch::has_room`]).
    pub fn push(&mut self, head: u16, start: u16, len: u64, pieces: &[libc::iovec]) -> bool {
        if !self.has_room(pieces.len()) {
            return false;
        }
        let at = self.iovecs.len();
        self.iovecs.extend_from_slice(pieces);
        self.frames.push(Frame {
            head,
            start,
            len,
            iov: at..self.iovecs.len(),
        });
        true
    }

    /// Empties the batch (its frames were handled).
    pub fn clear(&mut self) {
        self.frames.clear();
        self.iovecs.clear();
    }

    /// Writes the batch's frames to its tap, in order, in one `io_uring_enter`; their results, by
    /// frame, are then in [`WriteBatch::result`]. An error is the ring's own (the caller stops
    /// using it: [`WriteBatch::abandon`]); the results then say which frames are known to be
    /// done (a frame without a completion reads `-ECANCELED`: it may or may not have been
    /// sent).
    pub fn submit(&mut self) -> io::Result<()> {
        let count = self.frames.len().min(MAX_FRAMES);
        self.results = [-libc::ECANCELED; MAX_FRAMES];
        if count == 0 {
            return Ok(());
        }
        let fd = crate::uring::FILE;
        {
            let mut sq = self.ring.submission();
            for (i, frame) in self.frames.iter().take(count).enumerate() {
                let pieces = self.iovecs.get(frame.iov.clone()).unwrap_or_default();
                let entry = match pieces {
                    [one] => opcode::Write::new(
                        fd,
                        one.iov_base.cast_const().cast(),
                        u32::try_from(one.iov_len).unwrap_or(u32::MAX),
                    )
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .flags(Flags::FIXED_FILE),
                    _ => opcode::Writev::new(
                        fd,
                        pieces.as_ptr(),
                        u32::try_from(pieces.len()).unwrap_or(u32::MAX),
                    )
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .flags(Flags::FIXED_FILE),
                };
                let entry = entry.user_data(i as u64);
                // SAFETY: the iovecs and the guest memory they point into stay valid until
                // the writes complete: every write completes inside `submit` below
                // (RWF_NOWAIT), the caller holds guest memory for the whole round, and if a
                // write did not complete the caller leaks the whole batch (`abandon`) rather
                // than free its iovecs under the kernel.
                if unsafe { sq.push(&entry) }.is_err() {
                    return Err(io::Error::other("io_uring submission queue full"));
                }
            }
        }
        let submitted = self.ring.submit()?;
        let mut done = 0;
        for cqe in self.ring.completion() {
            if let Some(r) = self.results.get_mut(cqe.user_data() as usize) {
                *r = cqe.result();
            }
            done += 1;
        }
        if submitted < count || done < count {
            return Err(io::Error::other(format!(
                "{submitted} of {count} writes submitted, {done} completed at once"
            )));
        }
        Ok(())
    }

    /// The result of frame `i` of the last submission: bytes written or `-errno`.
    pub fn result(&self, i: usize) -> i32 {
        self.results.get(i).copied().unwrap_or(-libc::EIO)
    }

    /// Gives up on batching after [`WriteBatch::submit`] failed for a reason of the ring's
    /// own: a write may still be in flight from the iovecs, so they and the ring are leaked
    /// (once per queue pair at most), never freed.
    pub fn abandon(self) {
        std::mem::forget(self);
    }
}
