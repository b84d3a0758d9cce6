//! Executes the disk operations of one batch of requests: all at once through io_uring, or one
//! after the other with plain syscalls where io_uring is unavailable.

use std::io;

use io_uring::register::{Probe, Restriction};
use io_uring::{opcode, squeue, types, IoUring};
use log::{error, warn};

use crate::disk::{punch_hole_mode, zero_range_mode, AlignedBuf, DiskImage, MAX_IOVECS};
use crate::request::Segment;

/// One disk operation. The iovecs point into guest memory (or into `bounce`), which the caller
/// keeps mapped until [`Engine::run`] returns.
pub(crate) struct Op {
    pub kind: OpKind,
    /// Filled in by [`Engine::run`].
    pub result: io::Result<()>,
    /// O_DIRECT bounce buffer the iovecs point into, if the guest buffers were misaligned.
    pub bounce: Option<AlignedBuf>,
    /// Guest buffers a bounced read is copied back to.
    pub copy_back: Vec<Segment>,
}

pub(crate) enum OpKind {
    Read {
        iovecs: Vec<libc::iovec>,
        offset: u64,
        len: u64,
    },
    Write {
        iovecs: Vec<libc::iovec>,
        offset: u64,
        len: u64,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

impl Op {
    pub(crate) fn new(kind: OpKind) -> Op {
        Op {
            kind,
            result: Ok(()),
            bounce: None,
            copy_back: Vec::new(),
        }
    }
}

/// How operations reach the disk.
pub enum Engine {
    /// One ring per queue worker.
    Uring(Box<IoUring>),
    /// preadv/pwritev/fdatasync/fallocate, one at a time.
    Sync,
}

impl Engine {
    /// An io_uring engine with room for `entries` operations in flight, or the synchronous
    /// engine (and the reason) if io_uring cannot be used here.
    pub fn new(entries: u32) -> (Engine, Option<io::Error>) {
        match new_ring(entries) {
            Ok(ring) => (Engine::Uring(Box::new(ring)), None),
            Err(e) => (Engine::Sync, Some(e)),
        }
    }

    pub fn is_uring(&self) -> bool {
        matches!(self, Engine::Uring(_))
    }

    /// Runs every op and stores its outcome in `op.result`.
    pub(crate) fn run(&mut self, disk: &DiskImage, ops: &mut [Op]) {
        match self {
            Engine::Sync => {
                for op in ops.iter_mut() {
                    op.result = run_sync(disk, &op.kind);
                }
            }
            // A file in memory: every op is a copy (or a no-op flush) the worker thread does
            // faster itself than an io-wq worker woken for it (DiskImage::memory_backed).
            Engine::Uring(_) if disk.memory_backed() => {
                for op in ops.iter_mut() {
                    op.result = run_sync(disk, &op.kind);
                }
            }
            Engine::Uring(ring) => run_uring(ring, disk, ops),
        }
    }
}

/// The only operations a ring accepts (IORING_REGISTER_RESTRICTIONS): seccomp cannot see inside
/// io_uring_enter, so without this a compromised process could open files or sockets through
/// the ring (IORING_OP_OPENAT, IORING_OP_SOCKET, ...) whatever its filter says.
const ALLOWED_OPS: [u8; 4] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

fn new_ring(entries: u32) -> io::Result<IoUring> {
    // Created disabled, so its restrictions are in place before it accepts anything.
    let ring = IoUring::builder()
        .setup_r_disabled()
        .build(entries.clamp(1, 4096))?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let mut restrictions: Vec<Restriction> = ALLOWED_OPS
        .iter()
        .map(|op| Restriction::sqe_op(*op))
        .collect();
    // No SQE flags (no fixed files, links or buffer selection) and no register operations.
    restrictions.push(Restriction::sqe_flags_allowed(0));
    ring.submitter().register_restrictions(&mut restrictions)?;
    ring.submitter().register_enable_rings()?;
    for code in ALLOWED_OPS {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {code} is not supported by this kernel"),
            ));
        }
    }
    Ok(ring)
}

fn run_sync(disk: &DiskImage, kind: &OpKind) -> io::Result<()> {
    match kind {
        // SAFETY: the iovecs point into guest memory or a bounce buffer, both kept alive and
        // mapped by the caller of `Engine::run` until it returns (see `Op`).
        OpKind::Read { iovecs, offset, .. } => unsafe { disk.read_vectored_at(iovecs, *offset) },
        // SAFETY: as above.
        OpKind::Write { iovecs, offset, .. } => unsafe { disk.write_vectored_at(iovecs, *offset) },
        OpKind::Flush => disk.flush(),
        OpKind::Discard { offset, len } => disk.discard(*offset, *len),
        OpKind::WriteZeroes { offset, len, unmap } => disk.write_zeroes(*offset, *len, *unmap),
    }
}

/// The fallocate mode a write-zeroes op tries first, given what the image still supports.
fn write_zeroes_mode(disk: &DiskImage, unmap: bool) -> Option<i32> {
    let punch = disk.punch_hole_supported().then(punch_hole_mode);
    let zero = disk.zero_range_supported().then(zero_range_mode);
    if unmap {
        punch.or(zero)
    } else {
        zero.or(punch)
    }
}

/// The SQE for an op, or `None` if the op is better done synchronously.
fn build_entry(disk: &DiskImage, kind: &OpKind) -> Option<(squeue::Entry, i32)> {
    let fd = types::Fd(disk.fd());
    let entry = match kind {
        OpKind::Read { iovecs, offset, .. } => {
            let count = u32::try_from(iovecs.len())
                .ok()
                .filter(|&n| n as usize <= MAX_IOVECS)?;
            (
                opcode::Readv::new(fd, iovecs.as_ptr(), count)
                    .offset(*offset)
                    .build(),
                0,
            )
        }
        OpKind::Write { iovecs, offset, .. } => {
            let count = u32::try_from(iovecs.len())
                .ok()
                .filter(|&n| n as usize <= MAX_IOVECS)?;
            (
                opcode::Writev::new(fd, iovecs.as_ptr(), count)
                    .offset(*offset)
                    .build(),
                0,
            )
        }
        OpKind::Flush => (
            opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            0,
        ),
        OpKind::Discard { offset, len } => {
            if !disk.punch_hole_supported() {
                return None;
            }
            let mode = punch_hole_mode();
            (
                opcode::Fallocate::new(fd, *len)
                    .offset(*offset)
                    .mode(mode)
                    .build(),
                mode,
            )
        }
        OpKind::WriteZeroes { offset, len, unmap } => {
            let mode = write_zeroes_mode(disk, *unmap)?;
            (
                opcode::Fallocate::new(fd, *len)
                    .offset(*offset)
                    .mode(mode)
                    .build(),
                mode,
            )
        }
    };
    Some(entry)
}

/// Turns a completion into the op's result, finishing short transfers and unsupported
/// fallocate modes synchronously.
fn complete(disk: &DiskImage, kind: &OpKind, mode: i32, res: i32) -> io::Result<()> {
    if res < 0 {
        let err = io::Error::from_raw_os_error(-res);
        return match kind {
            OpKind::Discard { .. } if crate::disk::is_unsupported(&err) => {
                disk.note_punch_hole_unsupported();
                Ok(())
            }
            OpKind::WriteZeroes { offset, len, unmap } if crate::disk::is_unsupported(&err) => {
                if mode == punch_hole_mode() {
                    disk.note_punch_hole_unsupported();
                } else {
                    disk.note_zero_range_unsupported();
                }
                disk.write_zeroes(*offset, *len, *unmap)
            }
            _ => Err(err),
        };
    }
    match kind {
        OpKind::Read {
            iovecs,
            offset,
            len,
        }
        | OpKind::Write {
            iovecs,
            offset,
            len,
        } => {
            let done = res as u64;
            if done >= *len {
                return Ok(());
            }
            // Short transfer: do the rest synchronously.
            let rest = advance_iovecs(iovecs, done as usize);
            let at = offset + done;
            if matches!(kind, OpKind::Read { .. }) {
                // SAFETY: `rest` is a suffix of the op's iovecs, still valid (see `Op`).
                unsafe { disk.read_vectored_at(&rest, at) }
            } else {
                // SAFETY: as above.
                unsafe { disk.write_vectored_at(&rest, at) }
            }
        }
        _ => Ok(()),
    }
}

/// The iovecs left after `done` bytes.
fn advance_iovecs(iovecs: &[libc::iovec], mut done: usize) -> Vec<libc::iovec> {
    let mut rest = Vec::with_capacity(iovecs.len());
    for v in iovecs {
        if done >= v.iov_len {
            done -= v.iov_len;
            continue;
        }
        // SAFETY: `done < iov_len`, so the pointer stays inside the buffer.
        let base = unsafe { v.iov_base.cast::<u8>().add(done) };
        rest.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: v.iov_len - done,
        });
        done = 0;
    }
    rest
}

/// How many times in a row io_uring_enter may fail transiently before the process gives up.
const MAX_ENTER_RETRIES: u32 = 10_000;

fn run_uring(ring: &mut IoUring, disk: &DiskImage, ops: &mut [Op]) {
    let mut results: Vec<Option<i32>> = vec![None; ops.len()];
    let mut modes: Vec<i32> = vec![0; ops.len()];
    let mut next = 0usize;
    let mut in_flight = 0usize;
    let mut retries = 0u32;

    while next < ops.len() || in_flight > 0 {
        {
            let mut sq = ring.submission();
            while let Some(op) = ops.get_mut(next) {
                let Some((entry, mode)) = build_entry(disk, &op.kind) else {
                    op.result = run_sync(disk, &op.kind);
                    next += 1;
                    continue;
                };
                let entry = entry.user_data(next as u64);
                // SAFETY: the entry points at `op`'s iovec array and, through it, at guest
                // memory or `op.bounce`. `ops` is borrowed mutably for the whole of this
                // function and not changed until every submitted entry has completed (the
                // loop only ends with `in_flight == 0`), and the caller keeps the guest memory
                // mapped until we return.
                if unsafe { sq.push(&entry) }.is_err() {
                    break;
                }
                if let Some(m) = modes.get_mut(next) {
                    *m = mode;
                }
                next += 1;
                in_flight += 1;
            }
        }
        if in_flight == 0 {
            continue;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => retries = 0,
            Err(e) => {
                let transient = matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                );
                retries += 1;
                if !transient || retries > MAX_ENTER_RETRIES {
                    // Submitted entries still point into memory we are about to release; no
                    // safe way remains to recover them.
                    error!("io_uring_enter failed with {in_flight} requests in flight: {e}");
                    std::process::abort();
                }
                if e.raw_os_error() != Some(libc::EINTR) {
                    std::thread::yield_now();
                }
            }
        }
        for cqe in ring.completion() {
            let index = cqe.user_data() as usize;
            match results.get_mut(index) {
                Some(slot @ None) => {
                    *slot = Some(cqe.result());
                    in_flight = in_flight.saturating_sub(1);
                }
                _ => warn!("io_uring completion for unknown op {index}"),
            }
        }
    }

    for (index, op) in ops.iter_mut().enumerate() {
        if let Some(Some(res)) = results.get(index) {
            let mode = modes.get(index).copied().unwrap_or(0);
            op.result = complete(disk, &op.kind, mode, *res);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_advance_iovecs_partial_second_buffer_trimmed() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        let rest = advance_iovecs(&iov, 11);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].iov_len, 5);
        assert_eq!(rest[0].iov_base as usize, b.as_ptr() as usize + 3);
        assert!(advance_iovecs(&iov, 16).is_empty());
    }
}
