//! The jail of the block device process as the jail probe (`tests/jail-probe`) and the spawn
//! benchmark build it: what it is handed, and nothing else. The VMM links no device crate; its
//! device manager keeps its own per-kind policy, which must match this one (descriptor numbers
//! from the device-process contract in `docs/device-runtime.md`).
//!
//! The process gets the connected vhost-user socket as descriptor [`SOCKET_FD`], the image the
//! VMM opened as descriptor [`IMAGE_FD`], and optionally a log descriptor as its standard
//! error. It needs no path at all: its root is an empty read-only tmpfs, and the process
//! applies landlock itself at start (no path reachable). Start it with [`jail_args`] followed
//! by its other options.

use std::os::fd::{OwnedFd, RawFd};

use bulkhead_sandbox::{Jail, Rlimits};

/// The vhost-user socket's descriptor number inside the jail.
pub const SOCKET_FD: RawFd = 3;
/// The control channel's descriptor number, when one is passed.
pub const CONTROL_FD: RawFd = 4;
/// The disk image's descriptor number inside the jail.
pub const IMAGE_FD: RawFd = 5;
/// Standard error: where the log goes, if a log descriptor is passed.
pub const LOG_FD: RawFd = 2;

/// What the block device process is handed.
#[derive(Debug)]
pub struct JailFds {
    /// One end of the socket pair whose other end the VMM drives.
    pub socket: OwnedFd,
    /// The image, opened read-write (or read-only with `--readonly`) by the VMM.
    pub image: OwnedFd,
    /// Where the process logs (the VMM's stderr, or a pipe); /dev/null if none.
    pub log: Option<OwnedFd>,
}

/// The jail of a block device process serving `num_queues` queues.
///
/// Limits: descriptors up to 64 + 8 per queue (kick, call and error eventfds, an io_uring and
/// an epoll per queue, guest memory regions); 64 + 4 per queue processes or threads (one
/// worker per queue, io_uring's kernel workers); no core dumps; no address space limit (the
/// guest's RAM is mapped into the process and counts toward RLIMIT_AS). A memory bound
/// belongs in a cgroup ([`Jail::cgroup`]), which the VMM may add.
pub fn jail(fds: JailFds, num_queues: u16) -> Jail {
    let queues = u64::from(num_queues.max(1));
    let mut jail = Jail::new()
        .pass_fd(fds.socket, SOCKET_FD)
        .pass_fd(fds.image, IMAGE_FD)
        .rlimits(Rlimits {
            nofile: 64 + 8 * queues,
            nproc: 64 + 4 * queues,
            address_space: None,
            file_size: None,
        });
    if let Some(log) = fds.log {
        jail = jail.pass_fd(log, LOG_FD);
    }
    jail
}

/// The options that tell `bulkhead-block` where its jail put the socket and the image.
pub fn jail_args() -> [String; 4] {
    [
        "--socket-fd".into(),
        SOCKET_FD.to_string(),
        "--image-fd".into(),
        IMAGE_FD.to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("open").into()
    }

    #[test]
    fn test_jail_fds_at_fixed_numbers() {
        let j = jail(
            JailFds {
                socket: null(),
                image: null(),
                log: Some(null()),
            },
            4,
        );
        assert_eq!(j.fd_numbers(), vec![SOCKET_FD, IMAGE_FD, LOG_FD]);
        assert!(j.bind_mounts().is_empty(), "the block device needs no path");
        assert_eq!(j.rlimit_values().nofile, 96);
        assert_eq!(j.rlimit_values().address_space, None);
    }

    #[test]
    fn test_jail_args_match_fd_numbers() {
        assert_eq!(jail_args(), ["--socket-fd", "3", "--image-fd", "5"]);
    }
}
