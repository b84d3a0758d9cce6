//! The jail of the console device process as the jail probe can build it: what it is handed,
//! and nothing else. The VMM links no device crate; its device manager keeps its own per-kind
//! policy (`DeviceKind::Console`), which must match this one (descriptor numbers from the
//! device-process contract in `docs/device-runtime.md`).
//!
//! The process gets the connected vhost-user socket as descriptor [`SOCKET_FD`], the control
//! channel as [`CONTROL_FD`], and its host end from [`FIRST_HOST_FD`] on (one or two
//! descriptors). It needs no path (landlock: nothing reachable; its root is an empty read-only
//! tmpfs) and no network: a listening unix socket it was handed keeps accepting clients in an
//! empty network namespace, because a unix socket bound to a path belongs to the file system
//! it was bound in, not to the holder's namespace.

use std::os::fd::{OwnedFd, RawFd};

use bulkhead_sandbox::{Jail, Rlimits};

/// The vhost-user socket's descriptor number inside the jail.
pub const SOCKET_FD: RawFd = 3;
/// The control channel's descriptor number, when one is passed.
pub const CONTROL_FD: RawFd = 4;
/// The host end's first descriptor number.
pub const FIRST_HOST_FD: RawFd = 5;
/// Standard error: where the log goes, if a log descriptor is passed.
pub const LOG_FD: RawFd = 2;
/// RLIMIT_NOFILE: 64 (2 queues' kick, call and error eventfds, the worker's epoll and
/// eventfds, guest memory regions, one socket client).
pub const NOFILE: u64 = 64;
/// RLIMIT_NPROC and pids.max: 64 (the runtime's threads, the console worker).
pub const NPROC: u64 = 64;

/// What the console device process is handed.
#[derive(Debug)]
pub struct JailFds {
    /// One end of the socket pair whose other end the VMM drives.
    pub socket: OwnedFd,
    /// The host end, in the order of its options.
    pub host: Vec<OwnedFd>,
    /// Where the process logs; /dev/null if none.
    pub log: Option<OwnedFd>,
}

/// The jail of a console device process.
pub fn jail(fds: JailFds) -> Jail {
    let mut jail = Jail::new().pass_fd(fds.socket, SOCKET_FD);
    for (i, fd) in fds.host.into_iter().enumerate() {
        jail = jail.pass_fd(fd, FIRST_HOST_FD + i as RawFd);
    }
    jail = jail.rlimits(Rlimits {
        nofile: NOFILE,
        nproc: NPROC,
        address_space: None,
        file_size: None,
    });
    if let Some(log) = fds.log {
        jail = jail.pass_fd(log, LOG_FD);
    }
    jail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("open").into()
    }

    #[test]
    fn test_jail_fds_at_fixed_numbers() {
        let j = jail(JailFds {
            socket: null(),
            host: vec![null(), null()],
            log: Some(null()),
        });
        assert_eq!(j.fd_numbers(), vec![SOCKET_FD, 5, 6, LOG_FD]);
        assert!(
            j.bind_mounts().is_empty(),
            "the console device needs no path"
        );
        assert_eq!(j.rlimit_values().nofile, NOFILE);
        assert_eq!(j.rlimit_values().address_space, None);
    }
}
