//! The balloon device process's seccomp allowlist, installed by `start_backend` before the
//! first vhost-user message is read. Anything not listed kills the process
//! (SECCOMP_RET_KILL_PROCESS). On top of the runtime's own needs it allows exactly two calls:
//! `fallocate` with mode PUNCH_HOLE|KEEP_SIZE and nothing else (the filter cannot know which
//! descriptors arrive at run time, so it checks the mode: no allocation, no size change, no
//! COLLAPSE/INSERT/ZERO_RANGE), and `fstat` (the host page size of a new memory region).
//! Deliberately absent: opening any path (`open`, `openat`, `openat2`), `socket`, `connect`,
//! `memfd_create`, every `ioctl`, `execve`, `ptrace`, `mount`, `unshare`, `setns`,
//! `truncate`/`ftruncate` (it never resizes guest RAM), `clone` that is not a thread, and any
//! `mmap`/`mprotect` that asks for executable memory. See `docs/jail-seccomp.md`.

use bulkhead_sandbox::seccomp::{self, BpfProgram, Rules, SeccompError, TargetArch};

use crate::ram::PUNCH_HOLE_KEEP_SIZE;

/// The filter for the running architecture (x86_64 or aarch64), as installed.
pub fn seccomp_filter() -> Result<BpfProgram, SeccompError> {
    rules().compile_installed("bulkhead-balloon", seccomp::TraceFamily::Devices)
}

/// The filter for `arch`.
pub fn compile_for(arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    rules().compile("bulkhead-balloon", arch)
}

/// The balloon device's rules.
pub fn rules() -> Rules {
    // The runtime's own needs (vhost-user, the worker, threads, memory, logging, panic).
    let mut r = bulkhead_device_runtime::seccomp::runtime_rules();
    // Inflated and reported pages leave the guest-RAM file: ram::punch_hole, from the inflate
    // and reporting queues (queue::process_pages). Mode (argument 1) PUNCH_HOLE|KEEP_SIZE only.
    r.allow_arg("fallocate", 1, &[PUNCH_HOLE_KEEP_SIZE as u64]);
    // A new memory table's host page size (st_blksize: the huge page size on hugetlbfs):
    // ram::host_page_size, from BalloonBackend::update_memory. The raw call on both arches.
    r.allow("fstat");
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_device_runtime::testing::filter;
    use bulkhead_sandbox::seccomp::{run_in_child, ChildEnd};
    use std::os::fd::AsRawFd;

    #[test]
    fn test_allowlist_within_the_spawners() {
        filter::within_the_spawners(&rules());
    }

    #[test]
    fn test_seccomp_filter_compiles() {
        filter::compiles(compile_for, seccomp_filter());
    }

    #[test]
    fn test_allowlist_fallocate_punch_hole_only_nothing_opens() {
        let r = rules();
        let fallocate = |mode: u64| r.verdict("fallocate", &[5, mode, 0, 4096, 0, 0]);
        assert_eq!(fallocate(3), Some(true), "PUNCH_HOLE|KEEP_SIZE");
        // 0 (allocate), KEEP_SIZE, PUNCH_HOLE alone (EINVAL anyway), COLLAPSE_RANGE,
        // ZERO_RANGE, INSERT_RANGE, UNSHARE_RANGE, and the punch with another bit.
        for mode in [0u64, 1, 2, 0x08, 0x10, 0x20, 0x40, 0x13, 0x103] {
            assert_eq!(fallocate(mode), Some(false), "fallocate mode {mode:#x}");
        }
        for forbidden in [
            "openat",
            "open",
            "socket",
            "connect",
            "execve",
            "ptrace",
            "mount",
            "unshare",
            "setns",
            "memfd_create",
            "ioctl",
            "ftruncate",
            "io_uring_setup",
        ] {
            assert_ne!(
                r.verdict(forbidden, &[0; 6]),
                Some(true),
                "syscall {forbidden} is allowed"
            );
        }
    }

    #[test]
    fn test_seccomp_balloon_matrix_bpf_both_arches() {
        filter::matrix_on_bpf("balloon", &rules(), compile_for);
    }

    /// Under the real filter: the hole punch on a memfd goes through;
    /// fallocate in another mode, and opening a path, kill the process.
    #[test]
    fn test_seccomp_balloon_real_kernel_punch_allowed_others_killed() {
        let prog = seccomp_filter().expect("compile");
        if !filter::matrix_on_the_kernel("balloon", &rules(), &prog) {
            return;
        }
        let file = bulkhead_device_runtime::testing::memfd(1 << 20);
        let fd = file.as_raw_fd();
        // SAFETY: in the forked child: raw syscalls on our memfd, then _exit.
        let run = |mode: i32| unsafe {
            run_in_child(&prog, move || {
                let ret = libc::syscall(libc::SYS_fallocate, fd, mode, 0i64, 4096i64);
                libc::_exit(if ret == 0 { 0 } else { 1 });
            })
        };
        assert_eq!(run(PUNCH_HOLE_KEEP_SIZE), ChildEnd::Exited(0));
        assert_eq!(run(0), ChildEnd::Signalled(libc::SIGSYS), "allocate");
        assert_eq!(
            run(libc::FALLOC_FL_ZERO_RANGE),
            ChildEnd::Signalled(libc::SIGSYS),
            "zero range"
        );
        // SAFETY: in the forked child: a raw openat, then _exit.
        let open = unsafe {
            run_in_child(&prog, || {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/proc/self/mem".as_ptr(),
                    libc::O_RDWR,
                );
                libc::_exit(0);
            })
        };
        assert_eq!(open, ChildEnd::Signalled(libc::SIGSYS), "openat");
    }
}
