//! The block device process's seccomp allowlist, installed by `start_backend` after the image
//! and the socket are taken and before the first vhost-user message is read. Anything not
//! listed kills the process (SECCOMP_RET_KILL_PROCESS). `clone3` fails with ENOSYS so that the
//! C library creates threads with `clone`, whose flags the filter checks.
//!
//! Every entry names the code path that needs it. What is deliberately absent: opening any path
//! (`open`, `openat`, `openat2`), `socket`, `connect`, `bind`, `execve`, `ptrace`, `mount`,
//! `unshare`, `setns`, `io_uring_setup` (the rings exist before the filter does), `memfd_create`,
//! and any `mmap`/`mprotect` that asks for executable memory. See `docs/jail-seccomp.md`.

use bulkhead_sandbox::seccomp::{
    self, arg_eq, arg_masked_eq, rule, Allowlist, BpfProgram, SeccompError,
};

/// The filter for the running architecture (x86_64 or aarch64).
pub fn seccomp_filter() -> Result<BpfProgram, SeccompError> {
    seccomp::compile(allowlist()?, &[libc::SYS_clone3])
}

/// Syscall numbers allowed with any arguments, on both architectures.
fn common_syscalls() -> Vec<i64> {
    vec![
        // vhost-user messages: the vhost crate's Endpoint receives with recvmsg (SCM_RIGHTS
        // for memory regions and eventfds) and replies with sendmsg.
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        // Kick/call/err eventfds (vmm-sys-util EventFd read/write), env_logger to stderr
        // (fd 2, the VMM's log descriptor in the jail).
        libc::SYS_read,
        libc::SYS_write,
        // Closing eventfds and memory region files the frontend replaces, and the worker
        // loops' epoll/eventfds when the frontend disconnects.
        libc::SYS_close,
        // Synchronous I/O engine and write-zeroes fallback: disk::rw_vectored_all (preadv and
        // pwritev, also the musl/glibc form on both architectures).
        libc::SYS_preadv,
        libc::SYS_pwritev,
        // VIRTIO_BLK_T_FLUSH: DiskImage::flush (File::sync_data).
        libc::SYS_fdatasync,
        // VIRTIO_BLK_T_DISCARD / WRITE_ZEROES: DiskImage::fallocate.
        libc::SYS_fallocate,
        // The io_uring engine (engine::run_uring) submits and reaps on rings created before
        // the filter; io_uring_setup and io_uring_register stay forbidden.
        libc::SYS_io_uring_enter,
        // Worker threads: vhost_user::WorkerLoop (epoll on kick and exit eventfds) and the
        // eventfds it creates per connection.
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_epoll_create1,
        // Locks, condvars, thread joins (std::sync, JoinHandle::join).
        libc::SYS_futex,
        // engine::run_uring backs off with thread::yield_now.
        libc::SYS_sched_yield,
        // Guest memory: SET_MEM_TABLE maps the frontend's memfds (vm-memory
        // GuestRegionMmap) and unmaps the old table; the allocator.
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_mremap,
        // Thread start and exit (std::thread::spawn in VhostUserConnection::new and libc).
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sched_getaffinity,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_gettid,
        libc::SYS_getpid,
        // std's HashMap keys (RandomState) draw from getrandom.
        libc::SYS_getrandom,
        // Log timestamps (env_logger humantime) when the vDSO is not used.
        libc::SYS_clock_gettime,
        // panic=abort: abort() resets SIGABRT and raises it on itself (glibc: tgkill, musl:
        // tkill); glibc also installs its thread-cancellation handler (SIGRT_1) at the first
        // thread start.
        libc::SYS_rt_sigaction,
        libc::SYS_tgkill,
        libc::SYS_tkill,
    ]
}

/// The allowlist of the running architecture.
fn allowlist() -> Result<Allowlist, SeccompError> {
    let mut allow = Allowlist::new();
    for nr in common_syscalls().into_iter().chain(arch_syscalls()) {
        allow.insert(nr, vec![]);
    }
    // Threads only: clone without CLONE_THREAD would be fork (std::thread::spawn on musl, and
    // glibc after clone3 returned ENOSYS).
    allow.insert(
        libc::SYS_clone,
        vec![rule(vec![arg_masked_eq(
            0,
            libc::CLONE_THREAD as u64,
            libc::CLONE_THREAD as u64,
        )?])?],
    );
    // Guest memory regions (vm-memory MmapRegion::build), thread stacks and the allocator
    // map memory; never executable memory.
    let no_exec = || -> Result<_, SeccompError> {
        Ok(vec![rule(vec![arg_masked_eq(
            2,
            libc::PROT_EXEC as u64,
            0,
        )?])?])
    };
    allow.insert(libc::SYS_mmap, no_exec()?);
    // Thread stack guard pages (std and libc); never executable.
    allow.insert(libc::SYS_mprotect, no_exec()?);
    // Thread names (std::thread::Builder::name → PR_SET_NAME on the thread itself).
    allow.insert(
        libc::SYS_prctl,
        vec![rule(vec![arg_eq(0, libc::PR_SET_NAME as u64)?])?],
    );
    // Descriptor flags: adopt_socket_fd's FD_CLOEXEC, O_NONBLOCK on received eventfds.
    allow.insert(
        libc::SYS_fcntl,
        [
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_GETFL,
            libc::F_SETFL,
            libc::F_DUPFD_CLOEXEC,
        ]
        .into_iter()
        .map(|cmd| rule(vec![arg_eq(1, cmd as u64)?]))
        .collect::<Result<Vec<_>, _>>()?,
    );
    Ok(allow)
}

/// Syscalls only x86_64 has (aarch64 has only the generic `*at` and `p*` forms).
#[cfg(target_arch = "x86_64")]
fn arch_syscalls() -> Vec<i64> {
    vec![
        // epoll_wait where the C library does not use epoll_pwait (vmm-sys-util Epoll::wait).
        libc::SYS_epoll_wait,
    ]
}

#[cfg(target_arch = "aarch64")]
fn arch_syscalls() -> Vec<i64> {
    vec![]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_seccomp_filter_compiles() {
        let filter = seccomp_filter().expect("filter");
        assert!(filter.len() > 50 && filter.len() < 4096);
    }

    #[test]
    fn test_allowlist_no_path_open_or_socket() {
        let allow = allowlist().expect("allowlist");
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_register,
            libc::SYS_clone3,
            libc::SYS_memfd_create,
        ] {
            assert!(
                !allow.contains_key(&forbidden),
                "syscall {forbidden} is allowed"
            );
        }
    }
}
