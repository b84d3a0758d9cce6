//! The seccomp allowlist of the process that starts jailed programs: the VMM's device spawner
//! (`bulkhead-spawn`, `vmm/src/device/spawner.rs`), which applies it to itself once it is
//! forked and has opened what it keeps (the kernel log).
//!
//! A filter is inherited across fork and exec and stays evaluated, stacked under any filter
//! added later, for the life of the process. So this list covers, besides the spawner's own
//! loop, everything its children do: the jail set-up between fork and exec ([`crate::Jail`],
//! `child.rs`), the exec, a device program's start-up up to its own filter (the Rust and C
//! runtimes' start, landlock, opening its files, io_uring set-up), and everything that device
//! then does under its own, stricter filter. Every device kind's allowlist must therefore be a
//! subset of this one (by syscall); each device crate checks that in a unit test
//! (`devices/block/src/seccomp.rs`), and a device kind that needs more adds it here, with its
//! code path.
//!
//! What it keeps out of the spawner and of every process it starts: making sockets
//! (`socket`, `connect`, `bind`, `listen`, and `accept` but on a socket a process was handed
//! already listening: `accept4`, for bulkhead-console), `ptrace` and `process_vm_*`, `bpf`,
//! `perf_event_open`, `kexec_*`, kernel modules, keyrings, `userfaultfd`, `mknod`,
//! `open_by_handle_at`, `setns`, `chroot`, the new mount API (`fsopen`, `move_mount`, ...),
//! `reboot`, `swapon`, clock setting, `syslog`, `personality`, and every syscall not listed.
//! The list is per syscall: arguments are free where the jail needs them free (`clone` makes
//! namespaces, `mount` mounts), and restricted where the set-up uses a few values (`prctl`).
//! See `docs/jail-seccomp.md`.

use crate::seccomp::Rules;

/// The spawner's rules (and so the outer bound of every process it starts).
pub fn spawner_rules() -> Rules {
    let mut r = Rules::default();

    // ---- The spawner's own loop (spawner.rs `serve`, `handle_request`, `report_exit`).
    // Waits on the request socket and the children's pidfds; poll is x86_64's form.
    r.allow("ppoll").allow("poll");
    // (The filter is installed only under --sandbox on, where every child is jailed: the
    // plain children of --sandbox off, start_plain's fork, pidfd_open, execve and kill, never
    // run under it.)
    // Requests with descriptors (recv_with_fds) and replies with a pidfd (send_with_fd).
    r.allow("recvmsg").allow("sendmsg");
    // Exit reports on the events socket (UnixDatagram::send is write, below).
    // Reaping: JailedChild::try_wait/wait (waitpid, which is wait4).
    r.allow("wait4");
    // Killing the devices left when the VMM hangs up: JailedChild::kill (pidfd_send_signal).
    r.allow("pidfd_send_signal");
    // Fork: the jail's fork-like clone3 (CLONE_PIDFD and the CLONE_NEW* flags, which a
    // filter cannot read in clone3's memory argument) or clone; device processes' threads
    // (std::thread::spawn).
    r.allow("clone").allow("clone3");
    // The kernel log (audit::KmsgAudit::find): read and poll, opened before the filter.
    r.allow("read");
    // Cgroup leaves (jail::create_cgroup: mkdir, write memory.max/pids.max/cgroup.procs;
    // removal with rmdir), error pipes (pipe2), std::fs metadata.
    r.allow("openat").allow("open");
    r.allow("mkdirat").allow("mkdir");
    r.allow("unlinkat").allow("rmdir");
    r.allow("pipe2");
    r.allow("write").allow("close");
    r.allow("fstat")
        .allow("newfstatat")
        .allow("statx")
        .allow("lseek");
    // Descriptor moves (child.rs move_descriptors): fcntl F_DUPFD_CLOEXEC, dup2 (dup3 on
    // aarch64), close_range.
    r.allow("fcntl").allow("dup2").allow("dup3");
    r.allow("close_range");
    // glibc's abort (getpid, gettid), thread ids.
    r.allow("getpid").allow("gettid");
    // The Rust runtime and allocator: memory, locks, signals, time, randomness, exit.
    r.allow("mmap")
        .allow("mprotect")
        .allow("munmap")
        .allow("mremap");
    r.allow("brk").allow("madvise");
    r.allow("futex");
    r.allow("rt_sigaction")
        .allow("rt_sigprocmask")
        .allow("rt_sigreturn");
    r.allow("sigaltstack").allow("restart_syscall");
    r.allow("clock_gettime");
    r.allow("getrandom");
    r.allow("exit").allow("exit_group");
    // panic=abort raises SIGABRT on itself (tkill on musl, tgkill on glibc).
    r.allow("tkill").allow("tgkill");

    // ---- The jail set-up between fork and exec (sandbox child.rs, jail.rs).
    // Namespaces' mounts: the private root, the tmpfs stage, bind mounts, pivot_root into it,
    // the old root detached, the read-only remount.
    r.allow("mount").allow("umount2").allow("pivot_root");
    r.allow("chdir");
    // statvfs of a bind-mount source (jail.rs), for its mount flags.
    r.allow("statfs");
    // bulkhead-block's start-up (DiskImage::open, before its own filter): fstatfs tells
    // whether the image is in memory (tmpfs, ramfs, hugetlbfs), served inline, not by io_uring.
    r.allow("fstatfs");
    // uid_map/gid_map/setgroups of the user namespace (openat + write above); a host uid
    // for --device-uid (setgroups, setgid, setuid), then the namespace's ids (setres*).
    r.allow("setgroups").allow("setgid").allow("setuid");
    r.allow("setresgid").allow("setresuid");
    // Limits: setrlimit (prlimit64 in musl and glibc), getrlimit in close_from's fallback.
    r.allow("prlimit64").allow("getrlimit");
    // Dropping capabilities: capset.
    r.allow("capset");
    // prctl, only with what the set-up, the runtimes and the devices use: PR_SET_PDEATHSIG,
    // PR_SET_NO_NEW_PRIVS (child.rs, seccomp::apply), PR_SET_SECUREBITS, PR_CAPBSET_DROP,
    // PR_CAP_AMBIENT (drop_capabilities), PR_SET_NAME (set_comm, thread names), PR_GET_NAME
    // and PR_SET_DUMPABLE (left to the C library), PR_SET_SECCOMP is the seccomp syscall.
    r.allow_arg(
        "prctl",
        0,
        &[
            libc::PR_SET_PDEATHSIG as u64,
            libc::PR_SET_NO_NEW_PRIVS as u64,
            libc::PR_SET_SECUREBITS as u64,
            libc::PR_CAPBSET_DROP as u64,
            libc::PR_CAP_AMBIENT as u64,
            libc::PR_SET_NAME as u64,
            libc::PR_GET_NAME as u64,
            libc::PR_SET_DUMPABLE as u64,
        ],
    );
    // The program: execveat(AT_EMPTY_PATH) on its descriptor (child.rs).
    r.allow("execveat");

    // ---- A device program's start-up, up to its own filter (bulkhead-device-runtime).
    // The C runtime's start (musl: set_tid_address, x86_64's arch_prctl for the thread
    // pointer), the Rust runtime's (poll on 0-2, sigaltstack, sched_getaffinity for
    // available_parallelism, env_logger's terminal check (ioctl TCGETS / TIOCGWINSZ).
    r.allow("set_tid_address").allow("arch_prctl");
    r.allow("sched_getaffinity").allow("sched_yield");
    r.allow("set_robust_list").allow("rseq");
    r.allow("geteuid").allow("getegid");
    r.allow("ioctl");
    // Adopting the sockets: getsockopt(SO_TYPE) (startup::adopt_unix_socket).
    r.allow("getsockopt");
    // bulkhead-console with `--console socket=PATH`: clients of the listening socket the VMM
    // bound and handed in (its Worker::accept_client). With socket, bind and listen out, it
    // takes connections only on a socket the VMM made.
    r.allow("accept4");
    // Landlock (startup::apply_landlock), then the device's own filter (seccomp, after
    // PR_SET_NO_NEW_PRIVS).
    r.allow("landlock_create_ruleset")
        .allow("landlock_add_rule")
        .allow("landlock_restrict_self");
    r.allow("seccomp");
    // The block device's io_uring rings, made before its filter (engine::new_ring).
    r.allow("io_uring_setup").allow("io_uring_register");

    // ---- What devices do under their own filters (each device kind's allowlist, a subset
    // of this one): block (devices/block/src/seccomp.rs) and the kinds to come.
    r.allow("io_uring_enter");
    r.allow("preadv").allow("pwritev");
    r.allow("writev");
    r.allow("fdatasync").allow("fallocate");
    r.allow("epoll_create1")
        .allow("epoll_ctl")
        .allow("epoll_pwait")
        .allow("epoll_wait");
    r.allow("eventfd2");
    r
}

/// Syscalls [`spawner_rules`] must never allow.
pub const SPAWNER_FORBIDDEN: &[&str] = &[
    "socket",
    "connect",
    "ptrace",
    "setns",
    "unshare",
    "memfd_create",
    "socketpair",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seccomp::{
        check_matrix_bpf, check_matrix_real, enforcement, matrix, panic_under_filter_ends,
        ChildEnd, Enforcement, TargetArch,
    };

    #[test]
    fn test_spawner_rules_forbid_sockets_ptrace_setns() {
        let r = spawner_rules();
        for name in SPAWNER_FORBIDDEN {
            assert_eq!(r.verdict(name, &[0; 6]), Some(false), "{name} is allowed");
        }
        let prctl = |op: i32| r.verdict("prctl", &[op as u64, 0, 0, 0, 0, 0]);
        assert_eq!(prctl(libc::PR_SET_NAME), Some(true));
        assert_eq!(prctl(libc::PR_SET_MM), Some(false));
    }

    #[test]
    fn test_seccomp_spawner_matrix_bpf_both_arches() {
        let cases = matrix(&spawner_rules());
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let prog = spawner_rules()
                .compile("bulkhead-spawn", arch)
                .expect("compile");
            let failures = check_matrix_bpf(&prog, arch, &cases);
            assert!(failures.is_empty(), "{failures:#?}");
        }
        println!(
            "spawner filter: {} calls checked on x86_64 and aarch64 BPF",
            cases.len()
        );
    }

    #[test]
    fn test_seccomp_spawner_matrix_real_kernel() {
        let prog = spawner_rules()
            .compile("bulkhead-spawn", crate::seccomp::native_arch())
            .expect("compile");
        if enforcement(&prog) != Enforcement::Enforced {
            println!(
                "seccomp filters are not enforced here (qemu-user?): real-kernel matrix skipped"
            );
            return;
        }
        // Calls that would do harm for real with the matrix's placeholder arguments (all
        // ones) are left to the BPF matrix: none here do (bad descriptors, pointers, flags).
        let cases = matrix(&spawner_rules());
        let failures = check_matrix_real(&prog, &cases);
        assert!(failures.is_empty(), "{failures:#?}");
        assert_eq!(
            panic_under_filter_ends(&prog),
            ChildEnd::Signalled(libc::SIGABRT)
        );
        println!(
            "spawner filter: {} real calls checked, panic aborts",
            cases.len()
        );
    }
}
