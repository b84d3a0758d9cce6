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

/// The filter for the running architecture (x86_64 or aarch64).
pub fn seccomp_filter() -> Result<BpfProgram, SeccompError> {
    compile_for(seccomp::native_arch())
}

/// The filter for `arch`.
pub fn compile_for(arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    rules().compile("bulkhead-block", arch)
}

/// The block device's rules.
pub fn rules() -> Rules {
    let mut r = Rules::default();
    // vhost-user messages: the vhost crate's Endpoint receives with recvmsg (SCM_RIGHTS for
    // memory regions and eventfds) and replies with sendmsg.
    r.allow("recvmsg").allow("sendmsg");
    // Kick/call/err eventfds (vmm-sys-util EventFd read/write), env_logger to stderr (fd 2,
    // the VMM's log descriptor in the jail).
    r.allow("read").allow("write");
    // Closing eventfds and memory region files the frontend replaces, and the worker loops'
    // epoll/eventfds when the frontend disconnects.
    r.allow("close");
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
    // Worker threads: vhost_user::WorkerLoop (epoll on kick and exit eventfds) and the
    // eventfds it creates per connection; epoll_wait (x86_64 only) where the C library does
    // not use epoll_pwait (vmm-sys-util Epoll::wait). A throttled queue waits in the same
    // call, with a timeout (rate limiting: runtime retry_queue_after).
    r.allow("epoll_ctl")
        .allow("epoll_pwait")
        .allow("epoll_wait")
        .allow("eventfd2")
        .allow("epoll_create1");
    // Locks, condvars, thread joins (std::sync, JoinHandle::join).
    r.allow("futex");
    // engine::run_uring backs off with thread::yield_now.
    r.allow("sched_yield");
    // Guest memory: SET_MEM_TABLE maps the frontend's memfds (vm-memory GuestRegionMmap) and
    // unmaps the old table; the allocator.
    r.allow("munmap")
        .allow("madvise")
        .allow("brk")
        .allow("mremap");
    // Guest memory regions (vm-memory MmapRegion::build), thread stacks, the allocator and
    // thread stack guard pages map and protect memory; never executable memory.
    seccomp::allow_mappings_no_exec(&mut r);
    // Thread start and exit (std::thread::spawn in VhostUserConnection::new and libc).
    r.allow("set_robust_list")
        .allow("rseq")
        .allow("sigaltstack")
        .allow("rt_sigprocmask")
        .allow("sched_getaffinity")
        .allow("exit")
        .allow("exit_group")
        .allow("gettid")
        .allow("getpid");
    // Threads only: clone with the thread flags and no namespace (std::thread::spawn on
    // musl, and glibc once clone3 returned ENOSYS).
    seccomp::allow_threads_only(&mut r);
    // std's HashMap keys (RandomState) draw from getrandom.
    r.allow("getrandom");
    // Log timestamps (env_logger humantime), Instant::now in the rate limiter and the worker's
    // retry timeout, when the vDSO is not used.
    r.allow("clock_gettime");
    // panic=abort: abort() resets SIGABRT and raises it on itself (glibc: tgkill, musl:
    // tkill); glibc also installs its thread-cancellation handler (SIGRT_1) at the first
    // thread start.
    r.allow("rt_sigaction").allow("tgkill").allow("tkill");
    // Thread names (std::thread::Builder::name → PR_SET_NAME on the thread itself).
    r.allow_arg("prctl", 0, &[libc::PR_SET_NAME as u64]);
    // Descriptor flags: adopt_socket_fd's FD_CLOEXEC, O_NONBLOCK on received eventfds.
    r.allow_arg(
        "fcntl",
        1,
        &[
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_DUPFD_CLOEXEC as u64,
        ],
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_sandbox::seccomp::{
        check_matrix_bpf, check_matrix_real, enforcement, matrix, panic_under_filter_ends,
        ChildEnd, Enforcement,
    };

    #[test]
    fn test_seccomp_filter_compiles() {
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let filter = compile_for(arch).expect("filter");
            assert!(filter.len() > 50 && filter.len() < 4096);
        }
        seccomp_filter().expect("native filter");
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

    /// The spawner's filter stays on the device process under the device's own (filters are
    /// inherited and stacked): every syscall the device needs must be in the spawner's list.
    #[test]
    fn test_allowlist_within_the_spawners() {
        let spawner = bulkhead_sandbox::spawner_filter::spawner_rules();
        let r = rules();
        for name in r.allowed.keys().chain(r.enosys.iter()) {
            assert!(
                spawner.allowed.contains_key(name),
                "{name} is allowed for bulkhead-block but not by the spawner's filter"
            );
        }
        println!(
            "bulkhead-block: its {} syscalls are all in the spawner's filter",
            r.allowed.len()
        );
    }

    #[test]
    fn test_seccomp_block_matrix_bpf_both_arches() {
        let cases = matrix(&rules());
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let prog = compile_for(arch).expect("compile");
            let failures = check_matrix_bpf(&prog, arch, &cases);
            assert!(failures.is_empty(), "{failures:#?}");
        }
        println!(
            "block filter: {} calls checked on x86_64 and aarch64 BPF",
            cases.len()
        );
    }

    #[test]
    fn test_seccomp_block_matrix_real_kernel() {
        let prog = seccomp_filter().expect("compile");
        if enforcement(&prog) != Enforcement::Enforced {
            println!(
                "seccomp filters are not enforced here (qemu-user?): real-kernel matrix skipped"
            );
            return;
        }
        let cases = matrix(&rules());
        let failures = check_matrix_real(&prog, &cases);
        assert!(failures.is_empty(), "{failures:#?}");
        assert_eq!(
            panic_under_filter_ends(&prog),
            ChildEnd::Signalled(libc::SIGABRT)
        );
        println!(
            "block filter: {} real calls checked, panic aborts",
            cases.len()
        );
    }
}
