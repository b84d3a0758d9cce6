//! The part of every device's seccomp allowlist that the runtime itself needs: the vhost-user
//! server and its worker loops, the control thread, logging, threads, guest memory and the
//! panic path. A device crate starts its filter from [`runtime_rules`] and adds only what its
//! own data path calls, each with its code path (see `devices/*/src/seccomp.rs` and
//! `docs/jail-seccomp.md`).

use bulkhead_sandbox::seccomp::{self, Rules};

/// The rules every device process needs because it runs this runtime.
pub fn runtime_rules() -> Rules {
    let mut r = Rules::default();
    // vhost-user messages: the vhost crate's Endpoint receives with recvmsg (SCM_RIGHTS for
    // memory regions and eventfds) and replies with sendmsg; the control channel likewise.
    r.allow("recvmsg").allow("sendmsg");
    // Kick/call/err eventfds (vmm-sys-util EventFd read/write), env_logger to stderr (fd 2,
    // the VMM's log pipe in the jail).
    r.allow("read").allow("write");
    // Closing eventfds and memory region files the frontend replaces, and the worker loops'
    // epoll/eventfds when the frontend disconnects.
    r.allow("close");
    // The memory-table check reads a region's last byte (server::check_file_covers).
    r.allow("preadv");
    // Worker threads: server::WorkerLoop (epoll on kick and exit eventfds, its wait bounded
    // by retries) and the eventfds it creates per connection; epoll_wait (x86_64 only) where
    // the C library does not use epoll_pwait (vmm-sys-util Epoll::wait).
    r.allow("epoll_ctl")
        .allow("epoll_pwait")
        .allow("epoll_wait")
        .allow("eventfd2")
        .allow("epoll_create1");
    // Locks, condvars, thread joins (std::sync, JoinHandle::join).
    r.allow("futex");
    // Guest memory: SET_MEM_TABLE maps the frontend's memfds (vm-memory GuestRegionMmap) and
    // unmaps the old table; the allocator.
    r.allow("munmap")
        .allow("madvise")
        .allow("brk")
        .allow("mremap");
    // Guest memory regions (vm-memory MmapRegion::build), thread stacks, the allocator and
    // thread stack guard pages map and protect memory; never executable memory.
    seccomp::allow_mappings_no_exec(&mut r);
    // Thread start and exit (std::thread::spawn in VhostUserConnection::new, the control
    // thread, device workers, and libc).
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
    // Log timestamps (env_logger humantime), Instant::now in log and rate limiters, when the
    // vDSO is not used.
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

/// The syscalls `rules` allows that the spawner's filter does not. The spawner's filter stays
/// on every device process under its own (filters are inherited and stacked), so a device
/// whose list is not empty here would be killed by the spawner's filter.
pub fn outside_spawner(rules: &Rules) -> Vec<String> {
    let spawner = bulkhead_sandbox::spawner_filter::spawner_rules();
    rules
        .allowed
        .keys()
        .chain(rules.enosys.iter())
        .filter(|name| !spawner.allowed.contains_key(*name))
        .map(|name| name.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_runtime_rules_within_the_spawners() {
        assert_eq!(outside_spawner(&runtime_rules()), Vec::<String>::new());
    }
}
