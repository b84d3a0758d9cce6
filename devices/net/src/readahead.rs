//! Reading the tap several frames at a time: a batch of `read`s, each with `RWF_NOWAIT`, in
//! one `io_uring_enter`.
//!
//! A tap queue is a character device: each `read` takes one frame, and there is no
//! `recvmmsg` for it. At 64-byte frames the system call around each `read` (entry, the
//! seccomp filter, `fdget`, `rw_verify_area`, exit) costs about as much as the tap's own work,
//! so the rx path submits a batch of reads in one `io_uring_enter`. With `RWF_NOWAIT` every
//! read of the batch is tried at once, in submission order, and completes before the call
//! returns, with a frame or `EAGAIN` (the tap supports `IOCB_NOWAIT`, `FMODE_NOWAIT`): the
//! frames land in the batch's buffers in the tap's order and nothing stays in flight.
//!
//! The batch size follows the traffic: it doubles (up to [`MAX_SLOTS`]) while batches come
//! back full and falls to one more than the last batch found, so a quiet tap costs one
//! `io_uring_enter` with two reads per wake-up where plain reads took two system calls.
//! The buffers are one anonymous mapping made with the ring (nothing is allocated per frame);
//! its pages become resident as frames first fill them: one page a slot with small frames, up
//! to [`MAX_SLOTS`] × 64 KiB with 64 KiB segments.
//!
//! The ring is created before the seccomp filter (which allows `io_uring_enter` and neither
//! `io_uring_setup` nor `io_uring_register`), disabled until its restrictions are in place:
//! it accepts `IORING_OP_READ` and nothing else, each on the pair's tap (registered with the
//! ring, `crate::uring`), so it cannot be used to open files or sockets past the filter, nor
//! to read any other descriptor. Where io_uring is not available (an old kernel,
//! `kernel.io_uring_disabled`) the rx path reads one frame per `read`, as it always could.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::squeue::Flags;
use io_uring::{opcode, IoUring};
use vm_memory::mmap::MmapRegion;

use crate::tap::Tap;

/// Most reads in one batch.
pub const MAX_SLOTS: usize = 16;

/// The batch size after a wake-up: the frame that woke us, and the read that finds the tap
/// empty.
const FIRST_BATCH: usize = 2;

/// The slots' buffers: one private anonymous mapping (vm-memory's `MmapRegion`, unmapped when
/// dropped), `MAX_SLOTS` buffers of `buf_len` bytes.
struct Buffers {
    map: MmapRegion,
    buf_len: usize,
}

impl Buffers {
    fn new(buf_len: usize) -> io::Result<Buffers> {
        let len = buf_len
            .checked_mul(MAX_SLOTS)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let map = MmapRegion::new(len).map_err(io::Error::other)?;
        Ok(Buffers { map, buf_len })
    }

    fn get(&self, slot: usize) -> &[u8] {
        if slot >= MAX_SLOTS {
            return &[];
        }
        // SAFETY: slot < MAX_SLOTS, so the buffer is inside the mapping, which lives as long
        // as `self`; no read of the ring is writing it (they complete in `ReadAhead::submit`).
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(slot * self.buf_len), self.buf_len)
        }
    }

    fn get_mut(&mut self, slot: usize) -> &mut [u8] {
        if slot >= MAX_SLOTS {
            return &mut [];
        }
        // SAFETY: as in `get`, and `&mut self` makes the borrow exclusive.
        unsafe {
            std::slice::from_raw_parts_mut(self.map.as_ptr().add(slot * self.buf_len), self.buf_len)
        }
    }
}

/// A batch of reads on the tap, and their buffers.
pub struct ReadAhead {
    ring: IoUring,
    bufs: Buffers,
    /// The last batch's results, by slot: the frame's length or `-errno`.
    results: [i32; MAX_SLOTS],
    /// Slots in the last batch.
    len: usize,
    /// The next slot to hand out.
    next: usize,
    /// The size of the next batch.
    want: usize,
    /// The last batch was read in the current rx round (see [`ReadAhead::begin_round`]).
    fresh: bool,
}

/// A frame read ahead: which buffer holds it.
pub struct Slot(pub usize);

/// Why [`ReadAhead::next_frame`] has no frame.
#[derive(Debug)]
pub enum NoFrame {
    /// The tap was empty at the end of the last batch.
    Empty,
    /// A read failed (as a plain `read` on the tap would have).
    Tap(io::Error),
    /// The ring itself failed: stop batching ([`ReadAhead::abandon`]).
    Ring(io::Error),
    /// This kernel's tap does not take `RWF_NOWAIT` (`EOPNOTSUPP`: tun marks its files
    /// `FMODE_NOWAIT` only in newer kernels); no read consumed a frame and none is in flight,
    /// so the caller drops the `ReadAhead` and reads one frame at a time.
    Unsupported,
}

impl ReadAhead {
    /// A ring for batches of reads from `tap` (and no other descriptor) into buffers of
    /// `buf_len` bytes; an error (the reason, for the log) where io_uring is not available.
    pub fn new(buf_len: usize, tap: &Tap) -> io::Result<ReadAhead> {
        let ring = crate::uring::restricted_ring(
            MAX_SLOTS as u32,
            &[(opcode::Read::CODE, "IORING_OP_READ")],
            tap.as_raw_fd(),
        )?;
        Ok(ReadAhead {
            ring,
            bufs: Buffers::new(buf_len)?,
            results: [0; MAX_SLOTS],
            len: 0,
            next: 0,
            want: FIRST_BATCH,
            fresh: false,
        })
    }

    /// The buffer of `slot`.
    pub fn buf(&mut self, slot: &Slot) -> &mut [u8] {
        self.bufs.get_mut(slot.0)
    }

    /// The buffer of `slot`, to read.
    pub fn frame(&self, slot: &Slot) -> &[u8] {
        self.bufs.get(slot.0)
    }

    /// Forgets the frames read ahead (queue reset); returns how many there were.
    pub fn clear(&mut self) -> usize {
        let dropped = self
            .results
            .get(self.next..self.len)
            .map_or(0, |r| r.iter().filter(|&&n| n >= 0).count());
        self.len = 0;
        self.next = 0;
        self.want = FIRST_BATCH;
        dropped
    }

    /// An rx round starts: the worker has waited since the last batch (its epoll consumed the
    /// tap's readiness), so that batch's "empty" is stale: frames that came since then raised
    /// their edges while the worker was waiting for guest buffers, and no edge will come for
    /// them again. The round's first look past that batch reads the tap anew.
    pub fn begin_round(&mut self) {
        self.fresh = false;
    }

    /// The next frame: one read ahead, or the first of a new batch. [`NoFrame::Empty`] when
    /// the last read of a batch of this round found the tap empty, so edge-triggered readiness
    /// will fire again.
    pub fn next_frame(&mut self) -> Result<(Slot, usize), NoFrame> {
        loop {
            while self.next < self.len {
                let slot = self.next;
                self.next += 1;
                let res = self.results.get(slot).copied().unwrap_or(-libc::EIO);
                if res >= 0 {
                    return Ok((Slot(slot), res as usize));
                }
                if res == -libc::EAGAIN {
                    continue;
                }
                if res == -libc::EOPNOTSUPP {
                    // Refused before reading (kiocb_set_rw_flags): every read of the batch was.
                    self.len = 0;
                    self.next = 0;
                    return Err(NoFrame::Unsupported);
                }
                return Err(NoFrame::Tap(io::Error::from_raw_os_error(-res)));
            }
            let ended_empty = self.fresh
                && self.len > 0
                && self
                    .results
                    .get(self.len - 1)
                    .is_some_and(|&r| r == -libc::EAGAIN);
            self.len = 0;
            self.next = 0;
            if ended_empty {
                self.want = FIRST_BATCH;
                return Err(NoFrame::Empty);
            }
            self.submit().map_err(NoFrame::Ring)?;
        }
    }

    /// Gives up on batching after `next_frame` failed for a reason of the ring's own: a read
    /// may still be in flight into one of the buffers, so they and the ring are leaked (once
    /// per queue pair at most), never freed.
    pub fn abandon(self) {
        std::mem::forget(self);
    }

    /// Submits a batch of `want` reads and collects their results.
    fn submit(&mut self) -> io::Result<()> {
        let count = self.want.clamp(1, MAX_SLOTS);
        let fd = crate::uring::FILE;
        {
            let mut sq = self.ring.submission();
            for slot in 0..count {
                let buf = self.bufs.get_mut(slot);
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                let read = opcode::Read::new(fd, buf.as_mut_ptr(), len)
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .flags(Flags::FIXED_FILE)
                    .user_data(slot as u64);
                // SAFETY: the buffer is in `self.bufs`, which is not unmapped while a read is
                // in flight: every read of the batch completes before this function returns
                // (RWF_NOWAIT), and if one did not, or the submission failed, the caller leaks
                // the whole `ReadAhead` (`abandon`) rather than unmap the buffers under the
                // kernel.
                if unsafe { sq.push(&read) }.is_err() {
                    return Err(io::Error::other("io_uring submission queue full"));
                }
            }
        }
        self.results = [-libc::EAGAIN; MAX_SLOTS];
        // No wait: with RWF_NOWAIT every read completes inside this call.
        self.ring.submit()?;
        let mut done = 0;
        for cqe in self.ring.completion() {
            if let Some(r) = self.results.get_mut(cqe.user_data() as usize) {
                *r = cqe.result();
            }
            done += 1;
        }
        if done < count {
            return Err(io::Error::other(format!(
                "{} of {count} reads did not complete at once",
                count - done
            )));
        }
        let frames = self.results.iter().take(count).filter(|&&r| r >= 0).count();
        self.want = if frames == count {
            (count * 2).min(MAX_SLOTS)
        } else {
            (frames + 1).max(FIRST_BATCH)
        };
        self.len = count;
        self.next = 0;
        self.fresh = true;
        Ok(())
    }
}
