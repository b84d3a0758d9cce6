//! The jail of the balloon device process as the jail probe and the spawn benchmark can build
//! it: what it is handed, and nothing else. The VMM links no device crate; its device manager
//! keeps its own per-kind policy (`DeviceKind::Balloon`), which must match this one.
//!
//! The process gets the connected vhost-user socket as descriptor [`SOCKET_FD`] and the
//! control channel as [`CONTROL_FD`]; guest RAM arrives in the memory table. It needs no path
//! (landlock: nothing reachable; its root is an empty read-only tmpfs).

use std::os::fd::{OwnedFd, RawFd};

use bulkhead_sandbox::{Jail, Rlimits};

/// The vhost-user socket's descriptor number inside the jail.
pub const SOCKET_FD: RawFd = 3;
/// The control channel's descriptor number, when one is passed.
pub const CONTROL_FD: RawFd = 4;
/// Standard error: where the log goes, if a log descriptor is passed.
pub const LOG_FD: RawFd = 2;

/// What the balloon device process is handed.
#[derive(Debug)]
pub struct JailFds {
    /// One end of the socket pair whose other end the VMM drives.
    pub socket: OwnedFd,
    /// Where the process logs; /dev/null if none.
    pub log: Option<OwnedFd>,
}

/// The jail of a balloon device process: descriptors 64 + 8 per queue (kick, call and error
/// eventfds, guest memory regions, the stats timer's epoll and eventfd); 64 tasks (the
/// runtime's threads and the stats timer); no core dumps; no address space limit (the guest's
/// RAM is mapped into the process).
pub fn jail(fds: JailFds, queues: u64) -> Jail {
    let mut jail = Jail::new().pass_fd(fds.socket, SOCKET_FD);
    jail = jail.rlimits(Rlimits {
        nofile: 64 + 8 * queues.max(1),
        nproc: 64,
        address_space: None,
        file_size: None,
    });
    if let Some(log) = fds.log {
        jail = jail.pass_fd(log, LOG_FD);
    }
    jail
}

/// The options that tell `bulkhead-balloon` where its jail put the socket.
pub fn jail_args() -> Vec<String> {
    vec!["--socket-fd".to_string(), SOCKET_FD.to_string()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("open").into()
    }

    #[test]
    fn test_jail_fds_at_fixed_numbers_no_path() {
        let j = jail(
            JailFds {
                socket: null(),
                log: Some(null()),
            },
            4,
        );
        assert_eq!(j.fd_numbers(), vec![SOCKET_FD, LOG_FD]);
        assert!(j.bind_mounts().is_empty(), "the balloon needs no path");
        assert_eq!(j.rlimit_values().nofile, 64 + 8 * 4);
        assert_eq!(jail_args(), ["--socket-fd", "3"]);
    }
}
