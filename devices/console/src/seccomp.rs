//! The console device process's seccomp allowlist, installed by `start_backend` after the host
//! end and the socket are taken and before the first vhost-user message is read. Anything not
//! listed kills the process (SECCOMP_RET_KILL_PROCESS). `clone3` fails with ENOSYS so that the
//! C library creates threads with `clone`, whose flags the filter checks.
//!
//! What is deliberately absent: `socket`, `socketpair`, `connect`, `bind`, `listen` (no new
//! sockets, no new addresses: `accept4` only takes clients on the socket the VMM bound and
//! handed in), every `ioctl` (the device never touches a terminal's settings: the VMM put the
//! terminal or pty in raw mode; the console size travels in the configuration space), opening
//! any path (`open`, `openat`, `openat2`), `execve`, `ptrace`, `mount`, `unshare`, `setns`,
//! `memfd_create`, a `clone` that is not a thread or makes a namespace, and any
//! `mmap`/`mprotect` that asks for executable memory. See `docs/jail-seccomp.md`.

use bulkhead_sandbox::seccomp::{self, BpfProgram, Rules, SeccompError, TargetArch};

/// The filter for the running architecture (x86_64 or aarch64), as installed (traced in the
/// test-only seccomp rule usage trace, `bulkhead_sandbox::seccomp::TRACE_ENV`).
pub fn seccomp_filter() -> Result<BpfProgram, SeccompError> {
    rules().compile_installed("bulkhead-console", seccomp::TraceFamily::Devices)
}

/// The filter for `arch`.
pub fn compile_for(arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    rules().compile("bulkhead-console", arch)
}

/// The console device's rules.
pub fn rules() -> Rules {
    // The runtime's own needs (vhost-user, workers, threads, memory, logging, panic). Host
    // input and output are read and write on the host end (backend::read_fd, write_fd), and
    // the worker's epoll and eventfds (backend::Worker::run, ConsoleBackend::new) are the
    // runtime's calls too.
    let mut r = bulkhead_device_runtime::seccomp::runtime_rules();
    // `--console socket=PATH`: a client connects to the listening socket the VMM handed in
    // (backend::accept, from Worker::accept_client); with the flags SOCK_NONBLOCK|SOCK_CLOEXEC
    // only.
    r.allow_arg(
        "accept4",
        3,
        &[(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64],
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_device_runtime::testing::filter;

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
    fn test_allowlist_no_socket_no_path_no_ioctl() {
        let r = rules();
        for forbidden in [
            "openat",
            "socket",
            "socketpair",
            "connect",
            "bind",
            "listen",
            "ioctl",
            "execve",
            "execveat",
            "ptrace",
            "mount",
            "unshare",
            "setns",
            "clone3",
            "memfd_create",
            "io_uring_setup",
            "fallocate",
        ] {
            assert_ne!(
                r.verdict(forbidden, &[0; 6]),
                Some(true),
                "syscall {forbidden} is allowed"
            );
        }
        let flags = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
        assert_eq!(r.verdict("accept4", &[5, 0, 0, flags, 0, 0]), Some(true));
        assert_eq!(
            r.verdict("accept4", &[5, 0, 0, 0, 0, 0]),
            Some(false),
            "accept4 without SOCK_CLOEXEC"
        );
    }

    #[test]
    fn test_seccomp_console_matrix_bpf_both_arches() {
        filter::matrix_on_bpf("console", &rules(), compile_for);
    }

    #[test]
    fn test_seccomp_console_matrix_real_kernel() {
        let prog = seccomp_filter().expect("compile");
        filter::matrix_on_the_kernel("console", &rules(), &prog);
    }
}
