//! The net device process's seccomp allowlist, installed by `start_backend` after the tap
//! queues and the socket are taken and before the first vhost-user message is read. Anything
//! not listed kills the process (SECCOMP_RET_KILL_PROCESS). `clone3` fails with ENOSYS so that
//! the C library creates threads with `clone`, whose flags the filter checks.
//!
//! Written with the sandbox crate's one seccomp layer (`bulkhead_sandbox::seccomp`): syscalls
//! by name, compiled for either architecture. Every entry names the code path that needs it.
//! What is deliberately absent: `socket`, `socketpair`, `connect`, `bind`, `accept` (no new
//! sockets or peers), every `ioctl` but `TUNSETOFFLOAD` (so no `TUNSETIFF`, `TUNSETQUEUE`,
//! `TUNSETPERSIST`, `TUNSETOWNER`, `SIOCSIFNAME` or any other call that could attach,
//! re-attach, rename or reconfigure a tap), opening any path (`open`, `openat`, `openat2`),
//! `execve`, `ptrace`, `mount`, `unshare`, `setns`, `memfd_create`, a `clone` that is not a thread or makes a namespace,
//! and any `mmap`/`mprotect` that asks for executable memory. See `docs/jail-seccomp.md`.

use bulkhead_sandbox::seccomp::{self, BpfProgram, Rules, SeccompError, TargetArch};

use crate::tap::TUNSETOFFLOAD;

/// The filter for the running architecture (x86_64 or aarch64), as installed (traced in the
/// test-only seccomp rule usage trace, `bulkhead_sandbox::seccomp::TRACE_ENV`).
pub fn seccomp_filter() -> Result<BpfProgram, SeccompError> {
    rules().compile_installed("bulkhead-net", seccomp::TraceFamily::Devices)
}

/// The filter for `arch`.
pub fn compile_for(arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    rules().compile("bulkhead-net", arch)
}

/// The net device's rules.
pub fn rules() -> Rules {
    // The runtime's own needs (vhost-user, workers, threads, memory, logging, panic).
    let mut r = bulkhead_device_runtime::seccomp::runtime_rules();
    // A tx frame goes from guest memory to the tap in one writev (datapath::process_tx);
    // frames otherwise move with read/write on the tap queues (Tap::read, Tap::write).
    r.allow("writev");
    // rx reads the tap in batches on a ring made before the filter (readahead::ReadAhead: it
    // accepts IORING_OP_READ and nothing else), tx writes it in batches on another
    // (writebatch::WriteBatch: IORING_OP_WRITE and IORING_OP_WRITEV only); io_uring_setup and
    // io_uring_register stay forbidden.
    r.allow("io_uring_enter");
    // Guest offloads: Tap::set_offload, from acked_features (set_features) and the control
    // queue's GUEST_OFFLOADS_SET. The only ioctl, by request number.
    r.allow_ioctls(&[TUNSETOFFLOAD]);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::{TUNGETIFF, TUNSETIFF, TUNSETVNETHDRSZ};
    use bulkhead_device_runtime::testing::filter;
    use bulkhead_sandbox::seccomp::{enforcement, ChildEnd, Enforcement};

    /// The spawner's filter stays on the device process under the device's own.
    #[test]
    fn test_allowlist_within_the_spawners() {
        filter::within_the_spawners(&rules());
    }

    #[test]
    fn test_seccomp_filter_compiles() {
        filter::compiles(compile_for, seccomp_filter());
    }

    #[test]
    fn test_allowlist_no_socket_no_path_no_other_ioctl() {
        let r = rules();
        for forbidden in [
            "openat",
            "socket",
            "socketpair",
            "connect",
            "bind",
            "accept4",
            "execve",
            "execveat",
            "ptrace",
            "mount",
            "unshare",
            "setns",
            "clone3",
            "memfd_create",
            "timerfd_create",
            "io_uring_setup",
        ] {
            assert_ne!(
                r.verdict(forbidden, &[0; 6]),
                Some(true),
                "syscall {forbidden} is allowed"
            );
        }
        let ioctl = |request: u64| r.verdict("ioctl", &[5, request, 0, 0, 0, 0]);
        assert_eq!(ioctl(TUNSETOFFLOAD), Some(true));
        // TUNSETQUEUE, TUNSETPERSIST, TUNSETOWNER, TUNSETLINK, SIOCSIFNAME, FIONBIO.
        for request in [
            TUNSETIFF,
            TUNGETIFF,
            TUNSETVNETHDRSZ,
            0x4004_54d9,
            0x4004_54cb,
            0x4004_54cc,
            0x4004_54cd,
            0x8923,
            0x5421,
        ] {
            assert_eq!(ioctl(request), Some(false), "ioctl {request:#x} is allowed");
        }
    }

    #[test]
    fn test_seccomp_net_matrix_bpf_both_arches() {
        filter::matrix_on_bpf("net", &rules(), compile_for);
    }

    #[test]
    fn test_seccomp_net_matrix_real_kernel() {
        let prog = seccomp_filter().expect("compile");
        filter::matrix_on_the_kernel("net", &rules(), &prog);
    }

    /// What a compromised net process would try first, each in a forked child holding a real
    /// tap queue under the net filter: a socket of either kind, opening `/dev/net/tun` afresh,
    /// and every tap ioctl that could attach, re-attach, rename, persist or reconfigure the tap
    /// are killed (SIGSYS); `TUNSETOFFLOAD` and writing a frame to the queue are let through.
    /// Needs root for a network namespace and a tap: skipped with a message otherwise, except
    /// under `BULKHEAD_TEST_STRICT=1`, where that fails.
    #[test]
    fn test_tap_attacks_killed_under_the_filter() {
        use bulkhead_sandbox::seccomp::run_in_child;
        use std::os::fd::AsRawFd;

        let prog = seccomp_filter().expect("compile");
        if enforcement(&prog) != Enforcement::Enforced {
            println!("seccomp filters are not enforced here (qemu-user?): tap attacks skipped");
            return;
        }
        let cannot_run = |why: String| {
            assert!(
                std::env::var_os("BULKHEAD_TEST_STRICT").is_none(),
                "{why}: the tap attack test needs root (BULKHEAD_TEST_STRICT is set, so this fails)"
            );
            println!("{why}: tap attack test skipped");
        };
        if !std::path::Path::new("/dev/net/tun").exists() {
            return cannot_run("no /dev/net/tun".into());
        }
        // SAFETY: unshare of this test thread's network namespace; the tap lives there.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return cannot_run(format!(
                "cannot create a network namespace ({})",
                std::io::Error::last_os_error()
            ));
        }
        let tap = crate::Tap::open_named("bhjail0", 1)
            .expect("open tap")
            .pop()
            .expect("one queue");
        let fd = tap.as_raw_fd();
        let mut ifr = [0u8; 40];
        ifr[..7].copy_from_slice(b"bhevil0");
        let ifr = ifr.as_ptr();
        let ioctl = |request: u64, arg: usize| {
            // SAFETY: in the forked child: one raw ioctl on the tap queue, then _exit.
            unsafe {
                run_in_child(&prog, || {
                    libc::syscall(libc::SYS_ioctl, fd, request, arg);
                    libc::_exit(0);
                })
            }
        };
        let killed = ChildEnd::Signalled(libc::SIGSYS);
        // TUNSETQUEUE, TUNSETPERSIST, TUNSETOWNER, TUNSETGROUP, TUNSETLINK, TUNSETIFINDEX,
        // TUNSETTXFILTER, TUNSETSNDBUF, TUNATTACHFILTER, SIOCSIFNAME, SIOCSIFFLAGS, FIONBIO.
        for (name, request, arg) in [
            ("TUNSETIFF", TUNSETIFF, ifr as usize),
            ("TUNGETIFF", TUNGETIFF, ifr as usize),
            ("TUNSETVNETHDRSZ", TUNSETVNETHDRSZ, ifr as usize),
            ("TUNSETQUEUE", 0x4004_54d9, ifr as usize),
            ("TUNSETPERSIST", 0x4004_54cb, 1),
            ("TUNSETOWNER", 0x4004_54cc, 0),
            ("TUNSETGROUP", 0x4004_54ce, 0),
            ("TUNSETLINK", 0x4004_54cd, 1),
            ("TUNSETIFINDEX", 0x4004_54da, ifr as usize),
            ("TUNSETTXFILTER", 0x4004_54d1, ifr as usize),
            ("TUNSETSNDBUF", 0x4004_54d4, ifr as usize),
            ("TUNATTACHFILTER", 0x4010_54d5, ifr as usize),
            ("SIOCSIFNAME", 0x8923, ifr as usize),
            ("SIOCSIFFLAGS", 0x8914, ifr as usize),
            ("FIONBIO", 0x5421, ifr as usize),
        ] {
            assert_eq!(ioctl(request, arg), killed, "ioctl {name} on the tap");
        }
        assert_eq!(
            ioctl(TUNSETOFFLOAD, 0),
            ChildEnd::Exited(0),
            "TUNSETOFFLOAD"
        );
        // SAFETY: in the forked child: raw syscalls, then _exit.
        let run = |body: fn(i32)| unsafe { run_in_child(&prog, move || body(fd)) };
        let open_tun: fn(i32) = |_| {
            // SAFETY: raw openat with a NUL-terminated path.
            unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/dev/net/tun".as_ptr(),
                    libc::O_RDWR,
                );
            }
        };
        assert_eq!(run(open_tun), killed, "open /dev/net/tun");
        for (domain, kind) in [
            (libc::AF_INET, libc::SOCK_DGRAM),
            (libc::AF_INET6, libc::SOCK_STREAM),
            (libc::AF_PACKET, libc::SOCK_RAW),
            (libc::AF_NETLINK, libc::SOCK_RAW),
            (libc::AF_UNIX, libc::SOCK_STREAM),
        ] {
            // SAFETY: in the forked child: one raw socket call, then _exit.
            let end = unsafe {
                run_in_child(&prog, || {
                    libc::syscall(libc::SYS_socket, domain, kind, 0);
                    libc::_exit(0);
                })
            };
            assert_eq!(end, killed, "socket({domain}, {kind})");
        }
        let write_frame: fn(i32) = |fd| {
            // A 12-byte vnet header and a 60-byte frame to a broadcast address.
            let mut frame = [0u8; 72];
            frame[12..18].fill(0xff);
            frame[18..24].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
            frame[24..26].copy_from_slice(&[0x88, 0xb5]);
            // SAFETY: raw write of our buffer, then _exit with whether the tap took it (the
            // tap is down here, so EIO is its answer: the filter let the call through).
            unsafe {
                let n = libc::syscall(libc::SYS_write, fd, frame.as_ptr(), frame.len());
                let ok = n == 72 || *libc::__errno_location() == libc::EIO;
                libc::_exit(if ok { 0 } else { 1 });
            }
        };
        assert_eq!(
            run(write_frame),
            ChildEnd::Exited(0),
            "a frame written to the tap"
        );
    }
}
