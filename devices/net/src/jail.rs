//! The jail of the net device process as the jail probe and the spawn benchmark can build it:
//! what it is handed, and nothing else. The VMM links no device crate; its device manager
//! keeps its own per-kind policy (`DeviceKind::Net`), which must match this one (descriptor
//! numbers from the device-process contract in `docs/device-runtime.md`).
//!
//! The process gets the connected vhost-user socket as descriptor [`SOCKET_FD`], the control
//! channel as [`CONTROL_FD`], and one tap queue per queue pair from [`FIRST_TAP_FD`] on. It
//! needs no path at all (landlock: nothing reachable; its root is an empty read-only tmpfs)
//! and no network of its own: the spawner gives it an empty network namespace, and the tap
//! queues it holds keep working there because a tap queue belongs to the device it was
//! attached to, not to the holder's namespace.

use std::os::fd::{OwnedFd, RawFd};

use bulkhead_sandbox::{Jail, Rlimits};

/// The vhost-user socket's descriptor number inside the jail.
pub const SOCKET_FD: RawFd = 3;
/// The control channel's descriptor number, when one is passed.
pub const CONTROL_FD: RawFd = 4;
/// The first tap queue's descriptor number; pair `p` is `FIRST_TAP_FD + p`.
pub const FIRST_TAP_FD: RawFd = 5;
/// Standard error: where the log goes, if a log descriptor is passed.
pub const LOG_FD: RawFd = 2;

/// What the net device process is handed.
#[derive(Debug)]
pub struct JailFds {
    /// One end of the socket pair whose other end the VMM drives.
    pub socket: OwnedFd,
    /// The tap queues, one per queue pair, opened and configured by the VMM.
    pub taps: Vec<OwnedFd>,
    /// Where the process logs; /dev/null if none.
    pub log: Option<OwnedFd>,
}

/// The jail of a net device process: descriptors 64 + 8 per queue (kick, call and error
/// eventfds per queue, a worker's epoll and eventfds, guest memory regions); 64 + 2
/// per pair processes or threads (the runtime's thread and the worker of each pair); no core
/// dumps; no address space limit (the guest's RAM is mapped into the process).
pub fn jail(fds: JailFds) -> Jail {
    let pairs = fds.taps.len().max(1) as u64;
    let mut jail = Jail::new().pass_fd(fds.socket, SOCKET_FD);
    for (i, tap) in fds.taps.into_iter().enumerate() {
        jail = jail.pass_fd(tap, FIRST_TAP_FD + i as RawFd);
    }
    jail = jail.rlimits(Rlimits {
        nofile: 64 + 8 * (2 * pairs + 1),
        nproc: 64 + 2 * pairs,
        address_space: None,
        file_size: None,
    });
    if let Some(log) = fds.log {
        jail = jail.pass_fd(log, LOG_FD);
    }
    jail
}

/// The options that tell `bulkhead-net` where its jail put the socket and the tap queues.
pub fn jail_args(pairs: usize) -> Vec<String> {
    let mut args = vec!["--socket-fd".to_string(), SOCKET_FD.to_string()];
    for i in 0..pairs {
        args.push("--tap-fd".into());
        args.push((FIRST_TAP_FD + i as RawFd).to_string());
    }
    args
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
            taps: vec![null(), null()],
            log: Some(null()),
        });
        assert_eq!(j.fd_numbers(), vec![SOCKET_FD, 5, 6, LOG_FD]);
        assert!(j.bind_mounts().is_empty(), "the net device needs no path");
        assert_eq!(j.rlimit_values().nofile, 64 + 8 * 5);
        assert_eq!(j.rlimit_values().address_space, None);
    }

    #[test]
    fn test_jail_args_match_fd_numbers() {
        assert_eq!(
            jail_args(2),
            ["--socket-fd", "3", "--tap-fd", "5", "--tap-fd", "6"]
        );
    }
}
