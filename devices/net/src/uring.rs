//! The io_uring rings of a pair's worker (`readahead`, `writebatch`): each works on one file,
//! its pair's tap, registered with it, and accepts only the opcodes it needs, each on that
//! registered file (`IOSQE_FIXED_FILE` required, no other SQE flag), so a ring cannot be
//! turned to any other descriptor of the process or to anything else. The registered file
//! also spares each operation the lookup and reference count of a descriptor (`fget`/`fput`,
//! about 1% of a worker writing 64 KiB segments, measured in docs/benchmarks.md).

use std::io;
use std::os::fd::RawFd;

use io_uring::register::Restriction;
use io_uring::squeue::Flags;
use io_uring::{types, IoUring, Probe};

/// The ring's one file (its index in the registered files) for its operations.
pub const FILE: types::Fixed = types::Fixed(0);

/// A ring of `entries` that takes only `ops` (opcode, name for the error), each on `file`
/// (registered as [`FILE`]) and with no other SQE flag. Created disabled, so the file and the
/// restrictions are in place before it accepts anything; an error (the reason, for the log)
/// where io_uring or one of `ops` is not available. The ring holds a reference to `file`'s open
/// file until it is dropped.
pub fn restricted_ring(entries: u32, ops: &[(u8, &str)], file: RawFd) -> io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if let Some((_, name)) = ops.iter().find(|(op, _)| !probe.is_supported(*op)) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("io_uring has no {name} on this kernel"),
        ));
    }
    ring.submitter().register_files(&[file])?;
    let fixed = Flags::FIXED_FILE.bits();
    let mut restrictions: Vec<Restriction> = ops
        .iter()
        .map(|(op, _)| Restriction::sqe_op(*op))
        .chain([
            Restriction::sqe_flags_allowed(fixed),
            Restriction::sqe_flags_required(fixed),
        ])
        .collect();
    ring.submitter().register_restrictions(&mut restrictions)?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::tests::{recv, seqpacket_pair};
    use io_uring::{opcode, squeue, types};
    use std::os::fd::AsRawFd;

    /// Submits `entry` and returns its completion's result.
    fn run(ring: &mut IoUring, entry: squeue::Entry) -> i32 {
        // SAFETY: the entry's buffers live in the caller until it completes (below).
        unsafe { ring.submission().push(&entry) }.expect("room in the ring");
        ring.submit_and_wait(1).expect("io_uring_enter");
        ring.completion().next().expect("a completion").result()
    }

    #[test]
    fn test_ring_works_only_on_its_file() {
        let (mine, mine_peer) = seqpacket_pair();
        let (other, other_peer) = seqpacket_pair();
        let ops = [(opcode::Write::CODE, "IORING_OP_WRITE")];
        let mut ring = match restricted_ring(4, &ops, mine.as_raw_fd()) {
            Ok(ring) => ring,
            Err(e) => {
                assert!(
                    std::env::var_os("BULKHEAD_TEST_STRICT").is_none(),
                    "io_uring unavailable ({e}; BULKHEAD_TEST_STRICT is set, so this fails)"
                );
                eprintln!("io_uring unavailable ({e}): ring test not run");
                return;
            }
        };
        let msg = b"frame";
        // Another descriptor of the process, by number: refused before anything is written.
        let plain = opcode::Write::new(types::Fd(other.as_raw_fd()), msg.as_ptr(), 5).build();
        assert_eq!(run(&mut ring, plain), -libc::EACCES);
        // The registered file's own descriptor number, without the flag: refused the same way.
        let plain = opcode::Write::new(types::Fd(mine.as_raw_fd()), msg.as_ptr(), 5).build();
        assert_eq!(run(&mut ring, plain), -libc::EACCES);
        // An opcode the ring was not made for, even on its file: refused.
        let mut buf = [0u8; 8];
        let read = opcode::Read::new(FILE, buf.as_mut_ptr(), 8)
            .build()
            .flags(Flags::FIXED_FILE);
        assert_eq!(run(&mut ring, read), -libc::EACCES);
        assert!(recv(&mine_peer).is_none() && recv(&other_peer).is_none());
        // Its file, registered: written.
        let fixed = opcode::Write::new(FILE, msg.as_ptr(), 5)
            .build()
            .flags(Flags::FIXED_FILE);
        assert_eq!(run(&mut ring, fixed), 5);
        assert_eq!(recv(&mine_peer).as_deref(), Some(&msg[..]));
        assert!(recv(&other_peer).is_none());
    }
}
