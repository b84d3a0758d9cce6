//! The block device process's seccomp allowlist, installed by `start_backend` after the image
//! and the socket are taken and before the first vhost-user message is read. Anything not
//! listed kills the process (SECCOMP_RET_KILL_PROCESS). `clone3` fails with ENOSYS so that the
//! C library creates threads with `clone`, whose flags the filter checks.
//!
//! Written with the sandbox crate's one seccomp layer (`bulkhead_sandbox::seccomp`): syscalls
//! by name, compiled for either architecture. Every entry names the code path that needs it.
//! What is deliberately absent: opening any path (`open`, `openat`, `openat2`), `socket`,
//! `connect`, `bind`, `execve`, `ptrace`, `mount`, `unshare`, `setns`, `io_uring_setup` (the
//! rings exist before the filter does), `memfd_create`, a `clone` that is not a thread or
//! makes a namespace, and any `mmap`/`mprotect` that asks for executable memory. See
//! `docs/jail-seccomp.md`.

use bulkhead_sandbox::seccomp::{self, BpfProgram, Rules, SeccompError, TargetArch};

/// The filter for the running architecture (x86_64 or aarch64), as installed (traced in the
/// test-only seccomp rule usage trace, `bulkhead_sandbox::seccomp::TRACE_ENV`).
pub fn seccomp_filter() -> Result<BpfProgram, SeccompError> {
    rules().compile_installed("bulkhead-block", seccomp::TraceFamily::Devices)
}

/// The filter for `arch`.
pub fn compile_for(arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    rules().compile("bulkhead-block", arch)
}

/// The block device's rules.
pub fn rules() -> Rules {
    // The runtime's own needs (vhost-user, workers, threads, memory, logging, panic).
    let mut r = bulkhead_device_runtime::seccomp::runtime_rules();
    // Synchronous I/O engine and write-zeroes fallback: disk::rw_vectored_all (preadv and
    // pwritev, also the musl/glibc form on both architectures).
    r.allow("preadv").allow("pwritev");
    // VIRTIO_BLK_T_FLUSH: DiskImage::flush (File::sync_data).
    r.allow("fdatasync");
    // VIRTIO_BLK_T_DISCARD / WRITE_ZEROES: DiskImage::fallocate.
    r.allow("fallocate");
    // The io_uring engine (engine::run_uring) submits and reaps on rings created before the
    // filter; io_uring_setup and io_uring_register stay forbidden.
    r.allow("io_uring_enter");
    // engine::run_uring backs off with thread::yield_now; a polling queue worker
    // (--poll-us, BlockBackend::poll_avail) yields between looks at its ring.
    r.allow("sched_yield");
    // A copy through a tmpfs image's mapping that faults (the image was shrunk under it) is
    // caught by mapped::on_sigbus, which returns from the signal.
    r.allow("rt_sigreturn");
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_device_runtime::testing::filter;

    #[test]
    fn test_seccomp_filter_compiles() {
        filter::compiles(compile_for, seccomp_filter());
    }

    #[test]
    fn test_allowlist_no_path_open_or_socket() {
        let r = rules();
        for forbidden in [
            "openat",
            "socket",
            "connect",
            "execve",
            "execveat",
            "ptrace",
            "mount",
            "unshare",
            "setns",
            "io_uring_setup",
            "io_uring_register",
            "clone3",
            "memfd_create",
        ] {
            assert_ne!(
                r.verdict(forbidden, &[0; 6]),
                Some(true),
                "syscall {forbidden} is allowed"
            );
        }
    }

    /// The spawner's filter stays on the device process under the device's own.
    #[test]
    fn test_allowlist_within_the_spawners() {
        filter::within_the_spawners(&rules());
    }

    #[test]
    fn test_seccomp_block_matrix_bpf_both_arches() {
        filter::matrix_on_bpf("block", &rules(), compile_for);
    }

    #[test]
    fn test_seccomp_block_matrix_real_kernel() {
        let prog = seccomp_filter().expect("compile");
        filter::matrix_on_the_kernel("block", &rules(), &prog);
    }
}
