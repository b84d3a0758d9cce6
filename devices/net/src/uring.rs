//! The io_uring rings of a pair's worker (`readahead`, `writebatch`): each accepts only the
//! opcodes it needs and no SQE flags, so a ring cannot be turned to anything else.

use std::io;

use io_uring::register::Restriction;
use io_uring::{IoUring, Probe};

/// A ring of `entries` that takes only `ops` (opcode, name for the error) and no SQE flags.
/// Created disabled, so the restrictions are in place before it accepts anything; an error
/// (the reason, for the log) where io_uring or one of `ops` is not available.
pub fn restricted_ring(entries: u32, ops: &[(u8, &str)]) -> io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if let Some((_, name)) = ops.iter().find(|(op, _)| !probe.is_supported(*op)) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("io_uring has no {name} on this kernel"),
        ));
    }
    let mut restrictions: Vec<Restriction> = ops
        .iter()
        .map(|(op, _)| Restriction::sqe_op(*op))
        .chain([Restriction::sqe_flags_allowed(0)])
        .collect();
    ring.submitter().register_restrictions(&mut restrictions)?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}
